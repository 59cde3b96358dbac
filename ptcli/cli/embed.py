"""`ptcli embed`, registered on the app by cli/app.py: rows as the input embeddings a vLLM request sends."""

from __future__ import annotations

from typing import Annotated

import typer

from ptcli.cli.options import InferFile, ProjectOpt, QuietOpt, TrustOpt, handled
from ptcli.config import BaseOptions
from ptcli.enums import Dtype

app = typer.Typer()  # cli/app.py copies this command onto its app

Room = Annotated[
    int,
    typer.Option(
        "--tokens-to-generate",
        help="Room kept for the answer: a long text is cut from the left so that prompt, text and this many tokens "
        "fit the tag's --max-seq-length, as `ptcli infer` cuts it. Send it as the request's max_tokens.",
    ),
]
EmbedDtype = Annotated[
    Dtype,
    typer.Option("--dtype", help="Precision of the base, and so of the embeddings written (vLLM takes all three)."),
]


@app.command()
@handled
def embed(
    file: InferFile,
    tokens_to_generate: Room = 32,
    dtype: EmbedDtype = Dtype.FLOAT32,
    trust_remote_code: TrustOpt = False,
    project: ProjectOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write each row's input embeddings for vLLM's prompt_embeds (--enable-prompt-embeds): the tag's soft prompt
    placed by its template among the text's token embeddings, as ptcli's own forward feeds the base. stdout gets
    each input line with `prompt_embeds` (base64 of torch.save of an (N, H) tensor) added, in input order."""
    from ptcli.cli.console import emit_jsonl, say
    from ptcli.inference.embeds import embed as embed_rows
    from ptcli.project import manifest as proj

    rows = embed_rows(
        proj.load(project),
        file,
        tokens_to_generate=tokens_to_generate,
        base=BaseOptions(dtype, trust_remote_code),
        status=lambda m: say(m, quiet),
    )
    emit_jsonl(rows)
