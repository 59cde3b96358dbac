"""The command line: parse flags, call one core function, render. Errors become exit codes here.

The core commands live here; the bank's (show, remove-tag, rename-tag, export, import) in
cli_bank.py, and the option types and the error handler they share in cli_args.py.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so
`ptcli --help`, `list-tags` and shell completion stay fast.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated

import typer

from ptcli import __version__
from ptcli.cli_args import (
    AnswerOnly,
    BatchSize,
    Constant,
    DtypeOpt,
    Ensemble,
    Grouped,
    Init,
    InitText,
    JsonOpt,
    Lr,
    MaxMinutes,
    MaxSeq,
    MaxSteps,
    MinLr,
    ProjectOpt,
    QuietOpt,
    Reparam,
    ReparamLr,
    Seed,
    Template,
    Train,
    TrustOpt,
    ValEvery,
    Valid,
    Warmup,
    _check_dtype,
    _complete_task_tags,
    _given,
    handled,
)
from ptcli.config import check_prompt_length, check_tag
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
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model: a local Hugging Face folder, a .gguf file, or a hub id. Default: SmolLM2-135M-Instruct.",
        ),
    ] = None,
    num_prompt_tokens: Annotated[
        int, typer.Option("--num-prompt-tokens", help="Soft prompt length, shared by every task in the project.")
    ] = 20,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Create a project: a manifest naming the base model and the prompt length, and an empty prompt bank."""
    from ptcli import project as proj
    from ptcli.console import emit_json, say

    check_prompt_length(num_prompt_tokens)
    p = proj.init(directory, base, num_prompt_tokens, trust_remote_code, status=lambda m: say(m, quiet))
    if as_json:
        emit_json({"project": str(p.root), "base": vars(p.base), "num_prompt_tokens": p.num_prompt_tokens})
    say(f"created project {p.root} (base {p.base.ref}, {p.num_prompt_tokens} prompt tokens)", quiet)


@app.command("add-task")
@handled
def add_task(
    tag: Annotated[str, typer.Argument(help="Task tag, as in the data's prompt_tag field.")],
    train: Train = None,
    valid: Valid = None,
    init: Init = None,
    init_text: InitText = None,
    answer_only: AnswerOnly = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    min_lr: MinLr = None,
    warmup_steps: Warmup = None,
    constant_steps: Constant = None,
    max_steps: MaxSteps = None,
    val_check_interval: ValEvery = None,
    max_seq_length: MaxSeq = None,
    seed: Seed = None,
    group_by_length: Grouped = None,
    ensemble: Ensemble = None,
    max_minutes: MaxMinutes = None,
    template: Template = None,
    reparam: Reparam = None,
    reparam_lr: ReparamLr = None,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Record a task and its settings, so that `ptcli tune --tag TAG` needs no more flags."""
    from ptcli import project as proj
    from ptcli.api import Project
    from ptcli.console import emit_json, say
    from ptcli.data import read_jsonl
    from ptcli.storage import project_lock

    check_tag(tag)
    p = proj.load(project)
    given = _given(
        train=train,
        valid=valid,
        init=init,
        init_text=init_text,
        answer_only=answer_only,
        batch_size=batch_size,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        constant_steps=constant_steps,
        max_steps=max_steps,
        val_check_interval=val_check_interval,
        max_seq_length=max_seq_length,
        seed=seed,
        group_by_length=group_by_length,
        ensemble=ensemble,
        max_minutes=max_minutes,
        template=template,
        reparam=reparam,
        reparam_lr=reparam_lr,
    )
    cfg = Project(p).task_configs([tag], given)[tag]
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
def tune(
    tag: Annotated[
        list[str],
        typer.Option(
            "--tag",
            metavar="<str>",
            help="Task tag to tune (new, or recorded by add-task); repeat it to tune several tags together over mixed batches.",
            autocompletion=_complete_task_tags,
        ),
    ],
    train: Train = None,
    valid: Valid = None,
    init: Init = None,
    init_text: InitText = None,
    answer_only: AnswerOnly = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    min_lr: MinLr = None,
    warmup_steps: Warmup = None,
    constant_steps: Constant = None,
    max_steps: MaxSteps = None,
    val_check_interval: ValEvery = None,
    max_seq_length: MaxSeq = None,
    seed: Seed = None,
    group_by_length: Grouped = None,
    ensemble: Ensemble = None,
    max_minutes: MaxMinutes = None,
    template: Template = None,
    reparam: Reparam = None,
    reparam_lr: ReparamLr = None,
    num_prompt_tokens: Annotated[
        int | None, typer.Option("--num-prompt-tokens", help="Must equal the project's prompt length (set by init).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run of this tag from its last checkpoint.")
    ] = False,
    auto_resume: Annotated[
        bool,
        typer.Option(
            "--auto-resume",
            help="Resume if there is a checkpoint, else start afresh: one command for a job's first launch and its relaunches.",
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Retune a tag that is already in the bank.")] = False,
    devices: Annotated[
        int,
        typer.Option("--devices", help="Processes (GPUs, or CPU workers) to tune with, launched through accelerate."),
    ] = 1,
    shard_base: Annotated[
        bool,
        typer.Option(
            "--shard-base",
            help="With --devices N: shard the frozen base over the N processes (FSDP), for bases too big for one device.",
        ),
    ] = False,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Tune a soft prompt with the base model and every other prompt frozen; keep the best by validation."""
    from ptcli import project as proj
    from ptcli.api import Project
    from ptcli.console import TuneReporter, emit_json, say
    from ptcli.storage import is_main_process

    tags = list(dict.fromkeys(check_tag(t) for t in tag))
    _check_dtype(dtype)
    p = proj.load(project)
    if num_prompt_tokens is not None and num_prompt_tokens != p.num_prompt_tokens:
        raise UsageError(
            f"--num-prompt-tokens {num_prompt_tokens} differs from the project's {p.num_prompt_tokens}; one length serves every task",
            hint="drop the flag, or init a new project with the length you want",
        )
    given = _given(
        train=train,
        valid=valid,
        init=init,
        init_text=init_text,
        answer_only=answer_only,
        batch_size=batch_size,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        constant_steps=constant_steps,
        max_steps=max_steps,
        val_check_interval=val_check_interval,
        max_seq_length=max_seq_length,
        seed=seed,
        group_by_length=group_by_length,
        ensemble=ensemble,
        max_minutes=max_minutes,
        template=template,
        reparam=reparam,
        reparam_lr=reparam_lr,
    )
    Project(p).task_configs(tags, given)  # bad settings are refused before any relaunch
    if devices < 1:
        raise UsageError(f"--devices must be at least 1, got {devices}")
    from ptcli import dist, preempt

    if shard_base and devices < 2 and not dist.in_launched_run():
        raise UsageError(
            "--shard-base shards over several processes: pass --devices 2 or more (or launch with accelerate/torchrun)"
        )
    if devices > 1 and not dist.in_launched_run():
        with preempt.on_sigterm():
            code = dist.relaunch(devices, sys.argv[1:])
        if code:
            raise PtcliError(
                f"the {devices}-process run failed (exit {code}); the bank is unchanged", hint="see the messages above"
            )
        return
    reporter = TuneReporter("+".join(tags), quiet or not is_main_process())
    with preempt.on_sigterm():
        results = Project(p).tune(
            tags,
            reporter=reporter,
            resume="auto" if auto_resume else resume,
            overwrite=overwrite,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            shard_base=shard_base,
            **given,
        )
    if not is_main_process():
        dist.exit_launched_worker()
        return
    if as_json:
        records = [{k: v for k, v in dataclasses.asdict(r).items() if k != "history"} for r in results]
        emit_json(records[0] if len(records) == 1 else records)
    from ptcli.record import headline

    for r in results:
        m, m0 = r.metrics, r.initial_metrics
        key = headline(m)
        say(
            f"tuned {r.tag!r}: {key} {m0.get(key, float('nan')):.3f} -> {m[key]:.3f} (best at step {r.best_step} of {r.steps}), "
            f"{r.seconds:.0f} s; saved {r.path}",
            quiet,
        )
    dist.exit_launched_worker()


@app.command()
@handled
def infer(
    file: Annotated[
        str, typer.Argument(help="jsonl with prompt_tag and text per line (tags may mix); '-' reads stdin.")
    ],
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="generate: greedy answers; rank: the likeliest of the tag's answer set (classification). Default: per tag, the mode its prompt was chosen by (list-tags shows it).",
            show_default=False,
        ),
    ] = None,
    choices: Annotated[
        str | None,
        typer.Option(
            "--choices", help="Comma-separated answer set for --mode rank (default: the answers seen in training)."
        ),
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate",
            help="Ranked tags: correct each answer's score by its score after a content-free input ('N/A'), contextual calibration.",
        ),
    ] = False,
    tokens_to_generate: Annotated[
        int, typer.Option("--tokens-to-generate", help="Most tokens generated per line (stops at end of sequence).")
    ] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Lines per forward pass.")] = 16,
    dtype: DtypeOpt = "float32",
    device_map: Annotated[
        str | None,
        typer.Option(
            "--device-map", help="Place a large base across devices, e.g. 'auto' (accelerate big-model loading)."
        ),
    ] = None,
    devices: Annotated[
        int, typer.Option("--devices", help="Processes (GPUs, or CPU workers) that share the rows; output as with one.")
    ] = 1,
    trust_remote_code: TrustOpt = False,
    project: ProjectOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document (predictions and accuracy) instead of jsonl lines.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Predict an answer for every line; stdout gets each input line with `prediction` added, in input order."""
    from ptcli import dist
    from ptcli import project as proj
    from ptcli.api import Project
    from ptcli.console import emit_json, emit_jsonl, err, say
    from ptcli.storage import is_main_process

    if devices < 1 or (devices > 1 and device_map):
        raise UsageError(f"--devices must be at least 1 and cannot go with --device-map, got {devices}")
    if tokens_to_generate < 1:
        raise UsageError(f"--tokens-to-generate must be at least 1, got {tokens_to_generate}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    _check_dtype(dtype)
    p = proj.load(project)
    options = [c.strip() for c in choices.split(",") if c.strip()] if choices is not None else None
    if options is not None and len(options) < 2:
        raise UsageError(f"--choices needs at least two comma-separated answers, got {choices!r}")
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
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        device_map=device_map,
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
        from rich.table import Table

        how = {
            "generate": "generated, exact match",
            "rank": "ranked answer set" + (", calibrated" if calibrate else ""),
        }
        table = Table("tag", "mode", "correct", "total", "accuracy", title="accuracy")
        for tag, s in sorted(result.accuracy.items()):
            table.add_row(
                tag, how[result.modes[tag]], str(int(s["correct"])), str(int(s["total"])), f"{s['accuracy']:.3f}"
            )
        err.print(table)
    dist.exit_launched_worker()


from ptcli import cli_bank, cli_check, cli_serve  # noqa: E402  (the bank commands come after the core ones in --help)

app.registered_commands += (
    cli_bank.app.registered_commands + cli_check.app.registered_commands + cli_serve.app.registered_commands
)


def main() -> None:
    app()
