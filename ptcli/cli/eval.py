"""`ptcli eval`, registered on the app by cli/app.py: lm-evaluation-harness tasks answered by a tag."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptcli.cli.options import (
    Calibrate,
    EngineOpt,
    InferBatch,
    JsonOpt,
    LlamaWeightsOpt,
    ProjectOpt,
    QuietOpt,
    handled,
    tag_flag,
)
from ptcli.config import BaseOptions
from ptcli.enums import Backend, LlamaWeights
from ptcli.errors import UsageError

app = typer.Typer()  # cli/app.py copies this command onto its app

EvalTag = Annotated[str, tag_flag("Task tag whose prompt answers the harness's requests.", metavar="<str>")]
Tasks = Annotated[
    str,
    typer.Option("--tasks", metavar="<str>", help="Comma-separated lm-eval task names (the harness's own or yours)."),
]
IncludePath = Annotated[
    Path | None,
    typer.Option("--include-path", metavar="<path>", help="A folder of your own task YAML files (local data)."),
]
Fewshot = Annotated[int | None, typer.Option("--num-fewshot", help="Examples put before each row's text.")]
Limit = Annotated[float | None, typer.Option("--limit", help="Documents per task (a count, or a fraction if < 1).")]


@app.command("eval")
@handled
def eval_(
    tag: EvalTag,
    tasks: Tasks,
    include_path: IncludePath = None,
    num_fewshot: Fewshot = None,
    limit: Limit = None,
    batch_size: InferBatch = 16,
    calibrate: Calibrate = False,
    engine: EngineOpt = Backend.TORCH,
    llama_weights: LlamaWeightsOpt = LlamaWeights.FILE,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score a tag with EleutherAI's lm-evaluation-harness: multiple-choice and loglikelihood tasks through ranked
    answers (--mode rank), generate_until tasks through greedy answers. stdout gets the harness's metrics."""
    from ptcli.cli.console import emit_json, say, show_eval
    from ptcli.project import manifest as proj

    try:
        from ptcli.evaluation.harness import evaluate
    except ImportError as e:
        raise UsageError(
            f"`ptcli eval` needs the lmeval extra ({(e.name or 'lm_eval').split('.')[0]} is not installed)",
            hint="pip install 'ptcli[lmeval]'",
        ) from None
    base = BaseOptions(engine=engine, llama_weights=llama_weights)  # refuses --llama-weights without llama.cpp
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UsageError("--tasks needs at least one task name")
    result = evaluate(
        proj.load(project),
        tag,
        names,
        include_path=include_path,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        base=base,
        calibrate=calibrate,
        status=lambda m: say(m, quiet),
    )
    emit_json(result) if as_json else show_eval(result)
