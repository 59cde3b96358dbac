"""Reading a request's body and waiting for its rows' answers: what every row-answering endpoint shares."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from starlette.requests import Request

from ptcli.errors import ServeError
from ptcli.serving.batcher import Batcher

DRAIN_LIMIT = 64 << 20  # an oversized body is read and dropped up to this much, so the 413 reaches the client


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past `limit` bytes (declared or sent), 400 if it is not JSON."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    size, chunks = 0, []
    async for (
        chunk
    ) in request.stream():  # read to the end even when too big (up to DRAIN_LIMIT), so the client hears 413
        size += len(chunk)
        too_big = too_big or size > limit
        if size > DRAIN_LIMIT:
            break
        if not too_big:
            chunks.append(chunk)
    if too_big:
        raise ServeError(f"the body is larger than this server's limit of {limit} bytes (--max-body-bytes)", status=413)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise ServeError(f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise ServeError(f"the body must be a JSON object, got {type(body).__name__}")
    return body


async def answers(request: Request, batcher: Batcher, items: list) -> list:
    """Queue the items and wait for their answers; if the client leaves first, its rows not yet run are dropped."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()

    def done(job) -> None:  # runs on the worker thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(lambda: None if finished.done() else finished.set_result(job))

    job = batcher.submit(items, done)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        job.cancelled = True
        raise
    finally:
        gone.cancel()
    if not finished.done():
        job.cancelled = True
        raise ServeError("the client closed the connection", status=499)
    if job.error:
        raise job.error
    return job.results


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
