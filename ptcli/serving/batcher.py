"""Dynamic batching: requests queue their rows; one worker thread answers them in batches.

The worker takes the oldest row, then waits until `max_batch` rows are queued or the oldest
has waited `max_wait` seconds, and runs up to `max_batch` rows, whatever their request or
tag, in one call of `run` (the engine's mixed-tag pass). One thread owns the model, so the
tokenizer and torch are never used concurrently. The queue is bounded in rows: a request
that does not fit is refused at once (`Busy`), never left to wait without limit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ptcli.errors import PtcliError, ServeError


class Busy(ServeError):
    """The queue is full: 503, with a Retry-After."""

    def __init__(self, queued: int, retry_after_s: int = 1):
        super().__init__(
            f"the server is busy ({queued} rows queued); retry shortly",
            status=503,
            headers={"Retry-After": str(retry_after_s)},
        )


class Job:
    """One request's rows. `done(job)` is called from the worker once every row has an answer or the job failed."""

    def __init__(self, items: list[Any], done: Callable[[Job], None]):
        self.items, self._done = items, done
        self.results: list[Any] = [None] * len(items)
        self.error: PtcliError | None = None
        self.cancelled = False  # its client left: rows not yet run are skipped
        self._left = len(items)

    def settle(self, index: int, result: Any) -> None:
        if isinstance(result, PtcliError):
            self.error = self.error or result
        self.results[index] = result
        self._left -= 1
        if self._left == 0:
            self._done(self)


class Batcher:
    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        status: Callable[[str], None] = lambda _: None,
        observe: Callable[[list[Any], list[Any]], None] = lambda items, results: None,
    ):
        self.run, self.max_batch, self.max_wait_s, self.max_queue, self.status = (
            run,
            max_batch,
            max_wait_s,
            max_queue,
            status,
        )
        self.observe = observe  # (items, results) of every model pass, on the worker thread: metrics.py
        self._queue: deque[tuple[Job, int, float]] = deque()  # (job, row index, time queued)
        self._cond = threading.Condition()
        self._closing = False
        self.batches = self.rows = 0  # answered so far: rows / batches is the mean batch size
        self._thread = threading.Thread(target=self._loop, name="ptcli-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Answer what is queued, then end the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def queued(self) -> int:
        return len(self._queue)

    def submit(self, items: list[Any], done: Callable[[Job], None]) -> Job:
        job = Job(items, done)
        with self._cond:
            if self._closing:
                raise ServeError("the server is shutting down", status=503)
            if len(self._queue) + len(items) > self.max_queue:
                raise Busy(len(self._queue))
            now = time.monotonic()
            self._queue.extend((job, i, now) for i in range(len(items)))
            self._cond.notify_all()
        return job

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._answer(batch)

    def _take(self) -> list[tuple[Job, int]] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None  # closing, and nothing left
            deadline = self._queue[0][2] + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._closing and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            n = min(len(self._queue), self.max_batch)
            return [self._queue.popleft()[:2] for _ in range(n)]

    def _answer(self, batch: list[tuple[Job, int]]) -> None:
        live = [(job, i) for job, i in batch if not (job.cancelled or job.error)]
        for job, i in batch:
            if job.cancelled or job.error:
                job.settle(i, job.error)
        if not live:
            return
        self.batches, self.rows = self.batches + 1, self.rows + len(live)
        try:
            results = self.run([job.items[i] for job, i in live])
        except Exception as e:  # noqa: BLE001  (a failed batch fails its requests, never the server)
            self.status(f"a batch of {len(live)} rows failed: {type(e).__name__}: {e}")
            results = [ServeError(f"the model failed on this batch ({type(e).__name__}: {e})", status=500)] * len(live)
        try:
            self.observe([job.items[i] for job, i in live], results)
        except Exception as e:  # noqa: BLE001  (a metric never costs a request its answer)
            self.status(f"metrics: {type(e).__name__}: {e}")
        for (job, i), result in zip(live, results):
            job.settle(i, result)
