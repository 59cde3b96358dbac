"""`ptcli serve`, registered on the app by cli/app.py.

The server stack (the `serve` extra) is imported only when it runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ptcli.cli.options import DtypeOpt, EngineOpt, LlamaWeightsOpt, ProjectOpt, QuietOpt, TrustOpt, handled
from ptcli.config import BaseOptions
from ptcli.enums import Backend, Dtype, LlamaWeights
from ptcli.errors import UsageError

app = typer.Typer()  # cli/app.py copies this command onto its app


Host = Annotated[
    str,
    typer.Option("--host", help="Address to listen on; anything but loopback is reachable by others (use --api-key)."),
]
Port = Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port, printed at start).")]
MaxBatch = Annotated[
    int,
    typer.Option(
        "--max-batch-size", help="Most rows, of any requests and tags, answered in one pass (1: no batching)."
    ),
]
MaxWait = Annotated[
    float, typer.Option("--max-wait-ms", help="How long the oldest queued row waits for a batch to fill.")
]
MaxQueue = Annotated[
    int, typer.Option("--max-queue", help="Most rows waiting; beyond it requests get 503 with Retry-After.")
]
MaxBody = Annotated[int, typer.Option("--max-body-bytes", help="Largest request body; beyond it requests get 413.")]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="PTCLI_API_KEY",
        show_default=False,
        help="Require `Authorization: Bearer KEY` on every endpoint but /health.",
    ),
]


@app.command()
@handled
def serve(
    project: ProjectOpt = None,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    max_batch_size: MaxBatch = 16,
    max_wait_ms: MaxWait = 5.0,
    max_queue: MaxQueue = 1024,
    max_body_bytes: MaxBody = 1_000_000,
    api_key: ApiKey = None,
    dtype: DtypeOpt = Dtype.FLOAT32,
    engine: EngineOpt = Backend.TORCH,
    llama_weights: LlamaWeightsOpt = LlamaWeights.FILE,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Serve every tag of the bank over HTTP (OpenAI-compatible completions and ptcli rows), batched across tags
    and requests."""
    from ptcli.cli.console import say
    from ptcli.project import manifest as proj

    try:
        from ptcli.serving.server import ServeConfig
        from ptcli.serving.server import serve as run
    except ImportError as e:
        raise UsageError(
            f"`ptcli serve` needs the serve extra ({e.name} is not installed)", hint="pip install 'ptcli[serve]'"
        ) from None
    cfg = ServeConfig(
        host=host,
        port=port,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        api_key=api_key,
        base=BaseOptions(dtype, trust_remote_code, engine=engine, llama_weights=llama_weights),
    )
    run(proj.load(project), cfg, status=lambda m: say(m, quiet))
