"""The command line: parse flags, call one core function, render. Errors become exit codes here.

The core commands live here; the bank's (list-tags, show, remove-tag, rename-tag, export, import) in
cli/bank.py, and the option types and the error handler they share in cli/options.py. The tuning
flags of add-task and tune come from TaskConfig's fields (`task_options`), so they are written once.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so
`ptcli --help`, `list-tags` and shell completion stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ptcli import __version__
from ptcli.cli import options as opt
from ptcli.cli.options import handled, task_options
from ptcli.config import BaseOptions, check_infer_flags, check_prompt_length, check_tag, check_tune_flags
from ptcli.enums import Backend, Dtype, LlamaWeights
from ptcli.errors import PtcliError, UsageError

app = typer.Typer(
    name="ptcli",
    help="Prompt tuning for decoder-only language models: one frozen base, one soft prompt per task tag.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: Rich's boxed help cuts long flag names at 80 columns
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ptcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Prompt tuning for decoder-only language models."""


@app.command()
@handled
def init(
    directory: Annotated[Path, typer.Argument(help="Project directory to create.")],
    base: opt.BaseOpt = None,
    num_prompt_tokens: opt.InitTokens = 20,
    trust_remote_code: opt.TrustOpt = False,
    as_json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
) -> None:
    """Create a project: a manifest naming the base model and the prompt length, and an empty prompt bank."""
    from ptcli.api import init_project
    from ptcli.cli.console import emit_json, say

    check_prompt_length(num_prompt_tokens)
    p = init_project(directory, base, num_prompt_tokens, trust_remote_code, status=lambda m: say(m, quiet))
    if as_json:
        emit_json({"project": str(p.root), "base": vars(p.base), "num_prompt_tokens": p.num_prompt_tokens})
    say(f"created project {p.root} (base {p.base.ref}, {p.num_prompt_tokens} prompt tokens)", quiet)


@app.command("add-task")
@handled
@task_options
def add_task(
    tag: opt.TagArg,
    project: opt.ProjectOpt = None,
    as_json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
    **settings: Any,
) -> None:
    """Record a task and its settings, so that `ptcli tune --tag TAG` needs no more flags."""
    from ptcli.api import Project
    from ptcli.cli.console import emit_json, say
    from ptcli.data.jsonl import read_jsonl
    from ptcli.project import manifest as proj
    from ptcli.project.storage import project_lock

    check_tag(tag)
    p = proj.load(project)
    cfg = Project(p).task_configs([tag], settings)[tag]
    read_jsonl(cfg.train, training=True, tag=tag)
    read_jsonl(cfg.valid, training=True, tag=tag)
    with project_lock(p.root, f"ptcli add-task {tag}"):
        p = proj.load(p.root)
        p.record_task(tag, cfg)
    if as_json:
        emit_json({"tag": tag, "config": cfg.to_dict()})
    say(f"recorded task {tag!r}; tune it with `ptcli tune --tag {tag}`", quiet)


@app.command()
@handled
@task_options
def tune(
    tag: opt.TuneTag,
    num_prompt_tokens: opt.TuneTokens = None,
    resume: opt.Resume = False,
    auto_resume: opt.AutoResume = False,
    overwrite: opt.Overwrite = False,
    devices: opt.Devices = 1,
    shard_base: opt.ShardBase = False,
    dtype: opt.DtypeOpt = Dtype.FLOAT32,
    trust_remote_code: opt.TrustOpt = False,
    project: opt.ProjectOpt = None,
    as_json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
    **settings: Any,
) -> None:
    """Tune a soft prompt with the base model and every other prompt frozen; keep the best by validation."""
    from ptcli import dist, preempt
    from ptcli.api import Project
    from ptcli.cli.console import TuneReporter, report_tuned
    from ptcli.project import manifest as proj
    from ptcli.project.storage import is_main_process
    from ptcli.tuning import trackers

    tags = list(dict.fromkeys(check_tag(t) for t in tag))
    p = proj.load(project)
    check_tune_flags(p.num_prompt_tokens, num_prompt_tokens, devices, shard_base, dist.in_launched_run())
    trackers.require(Project(p).task_configs(tags, settings))  # bad settings are refused before any relaunch
    if dist.relaunched(devices, sys.argv[1:]):
        return
    reporter = TuneReporter("+".join(tags), quiet or not is_main_process())
    with preempt.on_sigterm():
        results = Project(p).tune(
            tags,
            reporter=reporter,
            resume="auto" if auto_resume else resume,
            overwrite=overwrite,
            base=BaseOptions(dtype, trust_remote_code, shard=shard_base),
            **settings,
        )
    if not is_main_process():
        dist.exit_launched_worker()
        return
    report_tuned(results, as_json, quiet)
    dist.exit_launched_worker()


@app.command()
@handled
def infer(
    file: opt.InferFile,
    mode: opt.ModeOpt = None,
    choices: opt.ChoicesOpt = None,
    calibrate: opt.Calibrate = False,
    tokens_to_generate: opt.TokensToGenerate = 32,
    batch_size: opt.InferBatch = 16,
    dtype: opt.DtypeOpt = Dtype.FLOAT32,
    engine: opt.EngineOpt = Backend.TORCH,
    llama_weights: opt.LlamaWeightsOpt = LlamaWeights.FILE,
    device_map: opt.DeviceMap = None,
    devices: opt.InferDevices = 1,
    trust_remote_code: opt.TrustOpt = False,
    project: opt.ProjectOpt = None,
    as_json: opt.InferJson = False,
    quiet: opt.QuietOpt = False,
) -> None:
    """Predict an answer for every line; stdout gets each input line with `prediction` added, in input order."""
    from ptcli import dist
    from ptcli.api import Project
    from ptcli.cli.console import emit_json, emit_jsonl, say
    from ptcli.project import manifest as proj
    from ptcli.project.storage import is_main_process

    options = check_infer_flags(devices, device_map, tokens_to_generate, batch_size, choices)
    p = proj.load(project)
    if devices > 1 and engine == Backend.LLAMACPP:
        raise UsageError("--engine llama.cpp runs in one process on the CPU: drop --devices")
    if devices > 1 and not dist.in_launched_run():
        if file == "-":
            raise UsageError("--devices reads a file, not stdin ('-'): every process reads the rows")
        code = dist.relaunch(devices, sys.argv[1:])
        if code:
            raise PtcliError(f"the {devices}-process inference failed (exit {code})", hint="see the messages above")
        return
    result = Project(p).infer(
        file,
        mode=mode,
        choices=options,
        calibrated=calibrate,
        tokens_to_generate=tokens_to_generate,
        batch_size=batch_size,
        base=BaseOptions(dtype, trust_remote_code, device_map, engine=engine, llama_weights=llama_weights),
        status=lambda m: say(m, quiet or not is_main_process()),
    )
    if not is_main_process():
        dist.exit_launched_worker()
        return
    if as_json:
        emit_json({"predictions": result.rows, "accuracy": result.accuracy, "modes": result.modes})
    else:
        emit_jsonl(result.rows)
    if result.accuracy and not quiet:
        _show_accuracy(result.accuracy, result.modes, calibrate)
    dist.exit_launched_worker()


def _show_accuracy(accuracy: dict[str, dict[str, float]], modes: dict[str, str], calibrated: bool) -> None:
    """Per-tag accuracy for people, on stderr, saying how each tag answered."""
    from rich.table import Table

    from ptcli.cli.console import err

    how = {"generate": "generated, exact match", "rank": "ranked answer set" + (", calibrated" if calibrated else "")}
    table = Table("tag", "mode", "correct", "total", "accuracy", title="accuracy")
    for tag, s in sorted(accuracy.items()):
        table.add_row(tag, how[modes[tag]], str(int(s["correct"])), str(int(s["total"])), f"{s['accuracy']:.3f}")
    err.print(table)


# The bank, check and serve commands come after the core ones in --help.
from ptcli.cli import bank as cli_bank  # noqa: E402
from ptcli.cli import check as cli_check  # noqa: E402
from ptcli.cli import distill as cli_distill  # noqa: E402
from ptcli.cli import embed as cli_embed  # noqa: E402
from ptcli.cli import eval as cli_eval  # noqa: E402
from ptcli.cli import serve as cli_serve  # noqa: E402

app.registered_commands += (
    cli_bank.app.registered_commands + cli_check.app.registered_commands + cli_serve.app.registered_commands
)
app.registered_commands += cli_embed.app.registered_commands + cli_eval.app.registered_commands
_after_tune = [c.callback for c in app.registered_commands].index(tune) + 1
app.registered_commands[_after_tune:_after_tune] = cli_distill.app.registered_commands


def main() -> None:
    app()
