"""The batcher alone (stub engines, no model), and the server's answer to a full queue."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ptcli.errors import ServeError, UsageError
from ptcli.inference.engine import Prediction
from ptcli.project import bank
from ptcli.project.manifest import BaseInfo, ProjectDir
from ptcli.project.record import PromptRecord
from ptcli.serving.batcher import Batcher, Job


def _collect() -> tuple[list[Job], threading.Event, Callable[[Job], None]]:
    finished: list[Job] = []
    all_done = threading.Event()

    def done(job: Job) -> None:
        finished.append(job)
        all_done.set()

    return finished, all_done, done


def test_rows_of_several_jobs_share_batches_and_come_back_to_their_job() -> None:
    seen: list[list[str]] = []
    batcher = Batcher(lambda items: seen.append(items) or [x.upper() for x in items], max_batch=4, max_wait_s=0)
    finished, _, done = _collect()
    jobs = [batcher.submit([f"{j}a", f"{j}b"], done) for j in range(3)]  # queued before the worker starts
    batcher.start()
    batcher.stop()
    assert seen == [["0a", "0b", "1a", "1b"], ["2a", "2b"]]
    assert [j.results for j in jobs] == [["0A", "0B"], ["1A", "1B"], ["2A", "2B"]]
    assert sorted(map(id, finished)) == sorted(map(id, jobs)) and (batcher.batches, batcher.rows) == (2, 6)


def test_a_lone_row_waits_at_most_max_wait_for_company() -> None:
    batcher = Batcher(lambda items: items, max_batch=8, max_wait_s=0.3)
    _, all_done, done = _collect()
    batcher.start()
    t0 = time.monotonic()
    batcher.submit(["x"], done)
    assert all_done.wait(30)
    assert time.monotonic() - t0 >= 0.29
    batcher.stop()


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on() -> None:
    calls = []

    def run(items: list) -> list:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [UsageError("no room") if x == "bad" else x for x in items]

    batcher = Batcher(run, max_batch=1, max_wait_s=0)
    _, _, done = _collect()
    broken, mixed, fine = (batcher.submit(rows, done) for rows in (["a"], ["ok", "bad"], ["b"]))
    batcher.start()
    batcher.stop()
    assert isinstance(broken.error, ServeError) and broken.error.status == 500 and "boom" in broken.error.message
    assert isinstance(mixed.error, UsageError) and fine.error is None and fine.results == ["b"]


def test_rows_of_a_cancelled_job_are_skipped_and_a_full_queue_refuses() -> None:
    seen: list = []
    batcher = Batcher(lambda items: seen.extend(items) or items, max_batch=8, max_wait_s=0, max_queue=3)
    _, _, done = _collect()
    gone, kept = batcher.submit(["g1", "g2"], done), batcher.submit(["k"], done)
    with pytest.raises(ServeError) as refused:
        batcher.submit(["one too many"], done)
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    gone.cancelled = True
    batcher.start()
    batcher.stop()
    assert seen == ["k"] and kept.results == ["k"]
    with pytest.raises(ServeError, match="shutting down"):
        batcher.submit(["late"], done)


def _call(url: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    """A real server whose engine holds its first batch until released: one row runs, one waits, the next is refused."""
    import uvicorn

    from ptcli.serving.live_bank import LiveBank
    from ptcli.serving.server import Service, build_app, listen

    project = ProjectDir(tmp_path, BaseInfo("stub", "f" * 64, 8, "llama"), num_prompt_tokens=2)
    bank.put(project, "t", torch.zeros(2, 8), PromptRecord(config={"max_seq_length": 16}))
    entered, release = threading.Event(), threading.Event()

    def held(items: list) -> list:
        entered.set()
        release.wait(30)
        return [Prediction("held", 1) for _ in items]

    batcher = Batcher(held, max_batch=1, max_wait_s=0, max_queue=1)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(build_app(Service(LiveBank(project), batcher)), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/ptcli/infer"
    row = {"rows": [{"prompt_tag": "t", "text": "x"}]}
    batcher.start()
    thread.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_call, url, row)
            assert entered.wait(30)
            second = pool.submit(_call, url, row)
            deadline = time.monotonic() + 30
            while batcher.queued() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, headers, body = _call(url, row)
            assert status == 503 and headers["retry-after"] == "1" and "busy" in body["error"]["message"]
            release.set()
            assert [f.result(30)[2]["rows"][0]["prediction"] for f in (first, second)] == ["held", "held"]
        assert _call(url, row)[0] == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)
        batcher.stop()
