"""`ptcli serve`: the frozen base loaded once, every tag of the bank served over HTTP.

    GET  /health           liveness (no API key needed)
    GET  /v1/models        the served tags, OpenAI style
    POST /v1/completions   OpenAI completions; `model` is a tag (see openai_api.py)
    POST /v1/ptcli/infer   ptcli rows of any tags, answered as `ptcli infer` answers them

Requests are parsed on the event loop, queued as rows, and answered by the batcher's one
worker thread in mixed-tag batches (batcher.py, engine.py). Every refusal is a JSON error
with its status; nothing a request sends reaches the file system (tags are looked up in
the live bank's listing). SIGTERM or SIGINT: uvicorn stops accepting, in-flight requests
are answered, the worker drains, and `serve` returns (ptcli exits 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ptcli.config import BaseOptions
from ptcli.errors import PtcliError, ServeError, UsageError
from ptcli.project.manifest import ProjectDir
from ptcli.serving import openai_api
from ptcli.serving.batcher import Batcher
from ptcli.serving.live_bank import LiveBank

DRAIN_LIMIT = 64 << 20  # an oversized body is read and dropped up to this much, so the 413 reaches the client


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_body_bytes: int = 1_000_000
    api_key: str | None = None
    base: BaseOptions = BaseOptions()
    graceful_timeout_s: int = 60

    def __post_init__(self) -> None:
        problems = [
            f"--{flag} must be {rule}, got {value}"
            for flag, value, ok, rule in (
                ("port", self.port, 0 <= self.port <= 65535, "0 to 65535 (0: any free port)"),
                ("max-batch-size", self.max_batch_size, self.max_batch_size >= 1, "at least 1"),
                ("max-wait-ms", self.max_wait_ms, self.max_wait_ms >= 0, "0 or more"),
                ("max-queue", self.max_queue, self.max_queue >= self.max_batch_size, "at least --max-batch-size"),
                ("max-body-bytes", self.max_body_bytes, self.max_body_bytes >= 1024, "at least 1024"),
            )
            if not ok
        ]
        if self.api_key is not None and not self.api_key.strip():
            problems.append("--api-key (or PTCLI_API_KEY) must not be empty")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass
class Service:
    bank: LiveBank
    batcher: Batcher
    api_key: str | None = None
    max_body_bytes: int = 1_000_000


def _error(
    status: int, message: str, headers: Mapping[str, str] | None = None, extra: dict | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status, **(extra or {})}}, status, headers=headers
    )


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ServeError(
            "missing or wrong API key: send `Authorization: Bearer KEY`",
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )


def endpoint(handler: Callable[[Request, Service], Awaitable[Response]], public: bool = False):
    """Check the API key (unless public), refresh the bank, and turn refusals into JSON errors."""

    async def route(request: Request) -> Response:
        service: Service = request.app.state.service
        try:
            if not public:
                _authorize(request, service.api_key)
            service.bank.refresh()
            return await handler(request, service)
        except ServeError as e:
            return _error(e.status, e.message, e.headers, e.extra)
        except ClientDisconnect:  # gone while sending its body: nobody reads the answer
            return _error(499, "the client closed the connection")
        except PtcliError as e:
            return _error(400, e.message)

    return route


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
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


async def _answers(request: Request, service: Service, items: list) -> list:
    """Queue the items and wait for their answers; if the client leaves first, its rows not yet run are dropped."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()

    def done(job) -> None:  # runs on the worker thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(lambda: None if finished.done() else finished.set_result(job))

    job = service.batcher.submit(items, done)
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


async def health(request: Request, service: Service) -> Response:
    b = service.batcher
    return JSONResponse(
        {
            "status": "ok",
            "tags": len(service.bank.tags()),
            "queued_rows": b.queued(),
            "batches": b.batches,
            "rows": b.rows,
        }
    )


async def models(request: Request, service: Service) -> Response:
    data = [{"id": t, "object": "model", "created": 0, "owned_by": "ptcli"} for t in service.bank.tags()]
    return JSONResponse({"object": "list", "data": data})


async def completions(request: Request, service: Service) -> Response:
    body = await _json_body(request, service.max_body_bytes)
    items, stop, stream = openai_api.completion_request(body, service.bank)
    answers = await _answers(request, service, items)
    tag = items[0].prompt.tag
    if not stream:
        return JSONResponse(openai_api.completion_body(tag, answers, stop))
    head = openai_api.completion_head(tag)
    events = [{**head, "choices": [c]} for c in openai_api.completion_choices(answers, stop)]
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return StreamingResponse(iter(lines), media_type="text/event-stream")


async def rows(request: Request, service: Service) -> Response:
    items, records = openai_api.rows_request(await _json_body(request, service.max_body_bytes), service.bank)
    return JSONResponse(openai_api.rows_body(records, await _answers(request, service, items)))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail), exc.headers)


async def _crash(request: Request, exc: Exception) -> Response:
    return _error(500, f"internal error ({type(exc).__name__}); the server keeps running")


def build_app(service: Service) -> Starlette:
    app = Starlette(
        routes=[
            Route("/health", endpoint(health, public=True), methods=["GET"]),
            Route("/v1/models", endpoint(models), methods=["GET"]),
            Route("/v1/completions", endpoint(completions), methods=["POST"]),
            Route("/v1/ptcli/infer", endpoint(rows), methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _crash},
    )
    app.state.service = service
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so a taken port is reported before the model loads (and port 0 picks a free one)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise UsageError(
            f"cannot listen on {host}:{port}: {e.strerror or e}", hint="pick another --port or --host"
        ) from None
    return sock


@contextlib.contextmanager
def _signals_end_quietly() -> Iterator[None]:
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown.

    Under these handlers that ends nothing, so ptcli exits 0.
    """
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve(project: ProjectDir, cfg: ServeConfig, status: Callable[[str], None] = lambda _: None) -> None:
    """Load the base, serve the bank until SIGTERM/SIGINT, answer what is in flight, return."""
    import uvicorn

    from ptcli.inference.infer import open_engine

    sock = listen(cfg.host, cfg.port)
    engine = open_engine(project, cfg.base, 1, "cpu", status)
    bank = LiveBank(project, status)
    bank.refresh()
    batcher = Batcher(engine, cfg.max_batch_size, cfg.max_wait_ms / 1000, cfg.max_queue, status)
    app = build_app(Service(bank, batcher, cfg.api_key, cfg.max_body_bytes))
    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=cfg.graceful_timeout_s
        )
    )
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if not cfg.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        status(f"warning: listening on {host} without an API key; anyone who reaches it can use it (--api-key)")
    batcher.start()
    status(
        f"listening on {url} ({len(bank.tags())} tags; batches of up to {cfg.max_batch_size}, "
        f"waiting up to {cfg.max_wait_ms:g} ms)"
    )
    try:
        with _signals_end_quietly():
            server.run(sockets=[sock])
    finally:
        batcher.stop()
    status("stopped")
