"""`ptcli serve`: the frozen base loaded once, every tag of the bank served over HTTP.

    GET  /health           liveness (no API key needed)
    GET  /metrics          Prometheus text format: requests, latency, batch sizes, rows, tokens (metrics.py)
    GET  /v1/models        the served tags, OpenAI style
    POST /v1/completions   OpenAI completions; `model` is a tag (see openai_api.py)
    POST /v1/chat/completions  OpenAI chat: the base's chat template renders the messages (chat.py)
    POST /v1/ptcli/infer   ptcli rows of any tags, answered as `ptcli infer` answers them

Requests are parsed on the event loop, queued as rows, and answered by the batcher's one
worker thread in mixed-tag batches (batcher.py, engine.py). Every refusal is a JSON error
with its status; nothing a request sends reaches the file system (tags are looked up in
the live bank's listing). SIGTERM or SIGINT: uvicorn stops accepting, in-flight requests
are answered, the worker drains, and `serve` returns (ptcli exits 0).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ptcli.config import BaseOptions
from ptcli.enums import Backend
from ptcli.errors import PtcliError, ServeError, UsageError
from ptcli.project.manifest import ProjectDir
from ptcli.serving import chat, openai_api
from ptcli.serving.batcher import Batcher
from ptcli.serving.http_io import answers as _answers
from ptcli.serving.http_io import json_body as _json_body
from ptcli.serving.live_bank import LiveBank
from ptcli.serving.metrics import CONTENT_TYPE, Metrics


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
    render: chat.Render | None = None  # the base's chat template; None: /v1/chat/completions refuses
    metrics: Metrics = field(default_factory=Metrics)


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
        start = time.perf_counter()
        response: Response = _error(500, "internal error")  # what an exception that escapes becomes
        request.state.tag = ""  # a handler names its tag once the bank knows it (metrics.py)
        try:
            if not public:
                _authorize(request, service.api_key)
            service.bank.refresh()
            response = await handler(request, service)
        except ServeError as e:
            response = _error(e.status, e.message, e.headers, e.extra)
        except ClientDisconnect:  # gone while sending its body: nobody reads the answer
            response = _error(499, "the client closed the connection")
        except PtcliError as e:
            response = _error(400, e.message)
        finally:
            seconds = time.perf_counter() - start
            service.metrics.request(request.url.path, request.state.tag, response.status_code, seconds)
        return response

    return route


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
    request.state.tag = tag = items[0].prompt.tag
    answers = await _answers(request, service.batcher, items)
    if not stream:
        return JSONResponse(openai_api.completion_body(tag, answers, stop))
    head = openai_api.completion_head(tag)
    events = [{**head, "choices": [c]} for c in openai_api.completion_choices(answers, stop)]
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return StreamingResponse(iter(lines), media_type="text/event-stream")


async def chat_completions(request: Request, service: Service) -> Response:
    body = await _json_body(request, service.max_body_bytes)
    items, stop = chat.chat_request(body, service.bank, service.render)
    request.state.tag = tag = items[0].prompt.tag
    return JSONResponse(chat.chat_body(tag, await _answers(request, service.batcher, items), stop))


async def rows(request: Request, service: Service) -> Response:
    items, records = openai_api.rows_request(await _json_body(request, service.max_body_bytes), service.bank)
    tags = {it.prompt.tag for it in items}
    request.state.tag = tags.pop() if len(tags) == 1 else "(mixed)"
    return JSONResponse(openai_api.rows_body(records, await _answers(request, service.batcher, items)))


async def metrics(request: Request, service: Service) -> Response:
    return Response(service.metrics.exposition(), media_type=None, headers={"Content-Type": CONTENT_TYPE})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail), exc.headers)


async def _crash(request: Request, exc: Exception) -> Response:
    return _error(500, f"internal error ({type(exc).__name__}); the server keeps running")


def build_app(service: Service) -> Starlette:
    app = Starlette(
        routes=[
            Route("/health", endpoint(health, public=True), methods=["GET"]),
            Route("/metrics", endpoint(metrics), methods=["GET"]),
            Route("/v1/models", endpoint(models), methods=["GET"]),
            Route("/v1/completions", endpoint(completions), methods=["POST"]),
            Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
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
    bank = LiveBank(project, status, numpy=cfg.base.engine == Backend.LLAMACPP)
    bank.refresh()
    batcher = Batcher(engine, cfg.max_batch_size, cfg.max_wait_ms / 1000, cfg.max_queue, status)
    meters = Metrics(batcher.queued)
    batcher.observe = meters.batch
    app = build_app(Service(bank, batcher, cfg.api_key, cfg.max_body_bytes, chat.renderer(engine.tok), meters))
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
