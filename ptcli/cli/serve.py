"""`ptcli serve`, registered on the app by cli.py.

The server stack (the `serve` extra) is imported only when it runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ptcli.cli.options import DtypeOpt, ProjectOpt, QuietOpt, TrustOpt, handled
from ptcli.config import BaseOptions
from ptcli.enums import Dtype
from ptcli.errors import UsageError

app = typer.Typer()  # cli.py copies this command onto its app


@app.command()
@handled
def serve(
    project: ProjectOpt = None,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to listen on; anything but loopback is reachable by others (use --api-key)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port, printed at start).")] = 8000,
    max_batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch-size", help="Most rows, of any requests and tags, answered in one pass (1: no batching)."
        ),
    ] = 16,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", help="How long the oldest queued row waits for a batch to fill.")
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Most rows waiting; beyond it requests get 503 with Retry-After.")
    ] = 1024,
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", help="Largest request body; beyond it requests get 413.")
    ] = 1_000_000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="PTCLI_API_KEY",
            show_default=False,
            help="Require `Authorization: Bearer KEY` on every endpoint but /health.",
        ),
    ] = None,
    dtype: DtypeOpt = Dtype.FLOAT32,
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
        base=BaseOptions(dtype, trust_remote_code),
    )
    run(proj.load(project), cfg, status=lambda m: say(m, quiet))
