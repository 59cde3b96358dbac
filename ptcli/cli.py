"""The command line: parse flags, call one core function, render. Errors become exit codes here.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so
`ptcli --help`, `list-tags` and shell completion stay fast.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ptcli import __version__
from ptcli.config import TaskConfig, check_prompt_length, check_tag, merge_task
from ptcli.errors import PtcliError, UsageError

app = typer.Typer(
    name="ptcli",
    help="Prompt tuning for decoder-only language models: one frozen base, one soft prompt per task tag.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: Rich's boxed help cuts long flag names at 80 columns
)

_FIELD_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(TaskConfig)}


def _opt(name: str, *flags: str, **kw: Any) -> Any:
    return typer.Option(*flags, help=_FIELD_HELP[name], show_default=False, **kw)


ProjectOpt = Annotated[Optional[Path], typer.Option("--project", "-p", help="Project directory (default: the nearest one at or above the cwd).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Write the result to stdout as JSON.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the base model's own Python code to run.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Precision of the frozen base: float32, bfloat16 or float16.")]
Train = Annotated[Optional[str], _opt("train", "--train")]
Valid = Annotated[Optional[str], _opt("valid", "--valid")]
Init = Annotated[Optional[str], _opt("init", "--init")]
InitText = Annotated[Optional[str], _opt("init_text", "--init-text")]
AnswerOnly = Annotated[Optional[bool], _opt("answer_only", "--answer-only/--full-text-loss")]
BatchSize = Annotated[Optional[int], _opt("batch_size", "--batch-size")]
Lr = Annotated[Optional[float], _opt("lr", "--lr")]
MinLr = Annotated[Optional[float], _opt("min_lr", "--min-lr")]
Warmup = Annotated[Optional[int], _opt("warmup_steps", "--warmup-steps")]
Constant = Annotated[Optional[int], _opt("constant_steps", "--constant-steps")]
MaxSteps = Annotated[Optional[int], _opt("max_steps", "--max-steps")]
ValEvery = Annotated[Optional[int], _opt("val_check_interval", "--val-check-interval")]
MaxSeq = Annotated[Optional[int], _opt("max_seq_length", "--max-seq-length")]
Seed = Annotated[Optional[int], _opt("seed", "--seed")]
Grouped = Annotated[Optional[bool], _opt("group_by_length", "--group-by-length/--no-group-by-length")]
Ensemble = Annotated[Optional[int], _opt("ensemble", "--ensemble")]
MaxMinutes = Annotated[Optional[float], _opt("max_minutes", "--max-minutes")]


def _completion_project(ctx: typer.Context):
    """The project a completion is for: --project if already typed, else the one found from the cwd; None if none."""
    from ptcli import project as proj

    try:
        return proj.load(ctx.params.get("project"))
    except Exception:  # completion must never fail loudly
        return None


def _complete_bank_tags(ctx: typer.Context, incomplete: str) -> list[str]:
    """Tags in the bank (file names only: no torch, no model), for show and export."""
    from ptcli import bank

    p = _completion_project(ctx)
    return [t for t in bank.tags(p) if t.startswith(incomplete)] if p else []


def _complete_task_tags(ctx: typer.Context, incomplete: str) -> list[str]:
    """Tags in the bank or recorded by add-task, for tune --tag, remove-tag and rename-tag."""
    from ptcli import bank

    p = _completion_project(ctx)
    return sorted(t for t in set(bank.tags(p)) | set(p.tasks) if t.startswith(incomplete)) if p else []


class Format(str, Enum):
    """What `export` writes and `import` reads: ptcli's bank file, or a PEFT prompt-tuning adapter folder."""

    ptcli = "ptcli"
    peft = "peft"


def handled(fn):
    """Turn ptcli's errors into a message on stderr and an exit code (1 failure, 2 bad usage or input)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PtcliError as e:
            from ptcli.console import show_error

            show_error(e.message, getattr(e, "problems", []), e.hint)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ptcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Prompt tuning for decoder-only language models."""


@app.command()
@handled
def init(
    directory: Annotated[Path, typer.Argument(help="Project directory to create.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model: a local Hugging Face folder, a .gguf file, or a hub id. Default: SmolLM2-135M-Instruct.")] = None,
    num_prompt_tokens: Annotated[int, typer.Option("--num-prompt-tokens", help="Soft prompt length, shared by every task in the project.")] = 20,
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


def _given(**kw: Any) -> dict[str, Any]:
    return kw


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
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Record a task and its settings, so that `ptcli tune --tag TAG` needs no more flags."""
    from ptcli import project as proj
    from ptcli.console import emit_json, say
    from ptcli.data import read_jsonl
    from ptcli.storage import project_lock

    check_tag(tag)
    p = proj.load(project)
    given = _given(train=train, valid=valid, init=init, init_text=init_text, answer_only=answer_only, batch_size=batch_size, lr=lr, min_lr=min_lr,
                   warmup_steps=warmup_steps, constant_steps=constant_steps, max_steps=max_steps, val_check_interval=val_check_interval, max_seq_length=max_seq_length, seed=seed,
                   group_by_length=group_by_length, ensemble=ensemble, max_minutes=max_minutes)
    cfg = merge_task(p.tasks.get(tag), given)
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
    tag: Annotated[list[str], typer.Option("--tag", help="Task tag to tune (new, or recorded by add-task); repeat it to tune several tags together over mixed batches.", autocompletion=_complete_task_tags)],
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
    num_prompt_tokens: Annotated[Optional[int], typer.Option("--num-prompt-tokens", help="Must equal the project's prompt length (set by init).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of this tag from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Retune a tag that is already in the bank.")] = False,
    devices: Annotated[int, typer.Option("--devices", help="Processes (GPUs, or CPU workers) to tune with, launched through accelerate.")] = 1,
    shard_base: Annotated[bool, typer.Option("--shard-base", help="With --devices N: shard the frozen base over the N processes (FSDP), for bases too big for one device.")] = False,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Tune a soft prompt with the base model and every other prompt frozen; keep the best by validation."""
    from ptcli import project as proj
    from ptcli.console import TuneReporter, emit_json, say
    from ptcli.storage import is_main_process, project_lock

    tags = list(dict.fromkeys(check_tag(t) for t in tag))
    _check_dtype(dtype)
    p = proj.load(project)
    if num_prompt_tokens is not None and num_prompt_tokens != p.num_prompt_tokens:
        raise UsageError(
            f"--num-prompt-tokens {num_prompt_tokens} differs from the project's {p.num_prompt_tokens}; one length serves every task",
            hint="drop the flag, or init a new project with the length you want",
        )
    given = _given(train=train, valid=valid, init=init, init_text=init_text, answer_only=answer_only, batch_size=batch_size, lr=lr, min_lr=min_lr,
                   warmup_steps=warmup_steps, constant_steps=constant_steps, max_steps=max_steps, val_check_interval=val_check_interval, max_seq_length=max_seq_length, seed=seed,
                   group_by_length=group_by_length, ensemble=ensemble, max_minutes=max_minutes)
    cfgs = {t: merge_task(p.tasks.get(t), given) for t in tags}
    if devices < 1:
        raise UsageError(f"--devices must be at least 1, got {devices}")
    from ptcli import dist

    if shard_base and devices < 2 and not dist.in_launched_run():
        raise UsageError("--shard-base shards over several processes: pass --devices 2 or more (or launch with accelerate/torchrun)")
    if devices > 1 and not dist.in_launched_run():
        code = dist.relaunch(devices, sys.argv[1:])
        if code:
            raise PtcliError(f"the {devices}-process run failed (exit {code}); the bank is unchanged", hint="see the messages above")
        return
    name = "+".join(tags)
    reporter = TuneReporter(name, quiet or not is_main_process())
    from ptcli.train import tune_many

    def run() -> list:
        return tune_many(p, cfgs, reporter, resume=resume, overwrite=overwrite, dtype=dtype, trust_remote_code=trust_remote_code,
                         shard_base=shard_base)

    if is_main_process():
        with project_lock(p.root, f"ptcli tune --tag {' --tag '.join(tags)}"):
            results = run()
    else:
        results = run()
    if not is_main_process():
        return
    if as_json:
        records = [{k: v for k, v in dataclasses.asdict(r).items() if k != "history"} for r in results]
        emit_json(records[0] if len(records) == 1 else records)
    for r in results:
        m, m0 = r.metrics, r.initial_metrics
        key = "val_acc_rank" if "val_acc_rank" in m else "val_acc"
        say(
            f"tuned {r.tag!r}: {key} {m0.get(key, float('nan')):.3f} -> {m[key]:.3f} (best at step {r.best_step} of {r.steps}), "
            f"{r.seconds:.0f} s; saved {r.path}",
            quiet,
        )


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")


@app.command()
@handled
def infer(
    file: Annotated[str, typer.Argument(help="jsonl with prompt_tag and text per line (tags may mix); '-' reads stdin.")],
    mode: Annotated[str, typer.Option("--mode", help="generate: greedy answers; rank: the likeliest of the tag's answer set (classification).")] = "generate",
    choices: Annotated[Optional[str], typer.Option("--choices", help="Comma-separated answer set for --mode rank (default: the answers seen in training).")] = None,
    tokens_to_generate: Annotated[int, typer.Option("--tokens-to-generate", help="Most tokens generated per line (stops at end of sequence).")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Lines per forward pass.")] = 16,
    dtype: DtypeOpt = "float32",
    device_map: Annotated[Optional[str], typer.Option("--device-map", help="Place a large base across devices, e.g. 'auto' (accelerate big-model loading).")] = None,
    trust_remote_code: TrustOpt = False,
    project: ProjectOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document (predictions and accuracy) instead of jsonl lines.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Predict an answer for every line; stdout gets each input line with `prediction` added, in input order."""
    from ptcli import project as proj
    from ptcli.console import emit_json, emit_jsonl, err, say
    from ptcli.infer import infer as run_infer

    if tokens_to_generate < 1:
        raise UsageError(f"--tokens-to-generate must be at least 1, got {tokens_to_generate}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    _check_dtype(dtype)
    p = proj.load(project)
    options = [c.strip() for c in choices.split(",") if c.strip()] if choices is not None else None
    if options is not None and len(options) < 2:
        raise UsageError(f"--choices needs at least two comma-separated answers, got {choices!r}")
    result = run_infer(p, file, mode=mode, choices=options, tokens_to_generate=tokens_to_generate, batch_size=batch_size, dtype=dtype,
                       trust_remote_code=trust_remote_code, device_map=device_map, status=lambda m: say(m, quiet))
    if as_json:
        emit_json({"predictions": result.rows, "accuracy": result.accuracy})
    else:
        emit_jsonl(result.rows)
    if result.accuracy and not quiet:
        from rich.table import Table

        table = Table("tag", "correct", "total", "accuracy", title=f"accuracy ({'exact match' if mode == 'generate' else 'ranked answer set'})")
        for tag, s in sorted(result.accuracy.items()):
            table.add_row(tag, str(int(s["correct"])), str(int(s["total"])), f"{s['accuracy']:.3f}")
        err.print(table)


@app.command("list-tags")
@handled
def list_tags(project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
    """The prompts in the bank: length, steps, best validation metric, init, created."""
    from ptcli import bank
    from ptcli import project as proj
    from ptcli.console import emit_json, err

    p = proj.load(project)
    entries = [bank.read_meta(p, t) for t in bank.tags(p)]
    if as_json:
        emit_json([{"tag": e.tag, **{k: e.meta.get(k) for k in ("num_prompt_tokens", "steps", "best_step", "metrics", "init", "created", "updated")}} for e in entries])
        return
    from rich.table import Table

    table = Table("tag", "tokens", "steps", "val_acc", "val_loss", "init", "created", title=f"prompt bank of {p.root}")
    for e in entries:
        m = e.meta.get("metrics") or {}
        steps = e.meta.get("steps")
        table.add_row(e.tag, str(e.meta.get("num_prompt_tokens")), "-" if steps is None else str(steps), f"{m.get('val_acc', float('nan')):.3f}",
                      f"{m.get('val_loss', float('nan')):.4f}", str(e.meta.get("init")), str(e.meta.get("created")))
    err.print(table)


BankTag = Annotated[str, typer.Argument(help="Tag of a prompt in the bank.", autocompletion=_complete_bank_tags)]


@app.command()
@handled
def show(
    tag: BankTag,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write the training and validation curves to this PNG file.")] = None,
    project: ProjectOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Write the record and the curves to stdout as JSON.")] = False,
) -> None:
    """A prompt's settings, metrics and base (from its bank header) and its training/validation curves."""
    from ptcli import project as proj
    from ptcli import report
    from ptcli.console import emit_json, say, show_prompt

    p = proj.load(project)
    shown = report.show(p, tag)
    if plot is not None:  # first, so that a failure leaves no half-made report
        report.plot(tag, shown.curves, plot, shown.record.get("best_step"))
    if as_json:
        c = shown.curves
        emit_json({"tag": tag, "path": shown.path, "checksum_ok": shown.checksum_ok, "record": shown.record,
                   "curves": {"train": c.train, "valid": c.valid, "source": c.source}})
    else:
        show_prompt(shown)
    if plot is not None:
        say(f"wrote {plot}")


@app.command("remove-tag")
@handled
def remove_tag(
    tag: Annotated[str, typer.Argument(help="Tag to remove: its prompt, its run history, its recorded settings.", autocompletion=_complete_task_tags)],
    keep_task: Annotated[bool, typer.Option("--keep-task", help="Keep the settings add-task/tune recorded, so `tune --tag TAG` can retune it.")] = False,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Delete a tag from the project: bank/TAG.safetensors, runs/TAG/ and (unless --keep-task) its recorded settings."""
    from ptcli import manage
    from ptcli import project as proj
    from ptcli.console import emit_json, say

    result = manage.remove_tag(proj.load(project), tag, keep_task)
    if as_json:
        emit_json(dataclasses.asdict(result))
    what = ", ".join(result.removed + (["its recorded settings"] if result.task_record else [])) or "nothing"
    say(f"removed {tag!r}: {what}", quiet)


@app.command("rename-tag")
@handled
def rename_tag(
    old: Annotated[str, typer.Argument(help="Current tag.", autocompletion=_complete_task_tags)],
    new: Annotated[str, typer.Argument(help="New tag (must not exist yet).")],
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rename a tag: its prompt (header rewritten with the new tag), run history and recorded settings."""
    from ptcli import manage
    from ptcli import project as proj
    from ptcli.console import emit_json, say

    result = manage.rename_tag(proj.load(project), old, new)
    if as_json:
        emit_json(dataclasses.asdict(result))
    say(f"renamed {old!r} to {new!r}" + (f"; rows with prompt_tag {old!r} must now say {new!r}" if result.path else ""), quiet)


@app.command()
@handled
def export(
    tag: BankTag,
    out: Annotated[str, typer.Argument(help="ptcli: a .safetensors file (or a folder, or '-' for stdout). peft: an adapter folder.")],
    fmt: Annotated[Format, typer.Option("--format", help="ptcli: the bank file as is. peft: a PEFT prompt-tuning adapter folder.")] = Format.ptcli,
    force: Annotated[bool, typer.Option("--force", help="Overwrite what is at OUT.")] = False,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a prompt out of the bank: one self-describing .safetensors file, or a PEFT adapter."""
    from ptcli import manage
    from ptcli import project as proj
    from ptcli.console import emit_json, say

    p = proj.load(project)
    if out == "-":
        if fmt is not Format.ptcli or as_json:
            raise UsageError("OUT '-' (stdout) takes the ptcli format and no --json")
        if sys.stdout.isatty():
            raise UsageError("refusing to write a binary file to the terminal", hint=f"redirect it: ptcli export {tag} - > {tag}.safetensors")
        sys.stdout.buffer.write(manage.export_bytes(p, tag))
        sys.stdout.flush()
        return
    if fmt is Format.peft:
        from ptcli import peft_io

        result = peft_io.export(p, tag, Path(out), force)
    else:
        result = manage.export_file(p, tag, Path(out), force)
    if as_json:
        emit_json(dataclasses.asdict(result))
    how = f"; load it with peft.PeftModel.from_pretrained(base, {result.path!r})" if fmt is Format.peft else ""
    say(f"exported {tag!r} to {result.path}{how}", quiet)


@app.command("import")
@handled
def import_(
    source: Annotated[str, typer.Argument(metavar="FILE", help="A file made by `ptcli export` ('-' reads stdin), or a PEFT prompt-tuning adapter folder.")],
    tag: Annotated[Optional[str], typer.Option("--tag", help="Tag in this bank (default: the tag recorded in FILE; required for other PEFT adapters).")] = None,
    fmt: Annotated[Optional[Format], typer.Option("--format", help="Default: peft for a folder, ptcli for a file.", show_default=False)] = None,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Add an exported prompt or a PEFT prompt-tuning adapter to the bank, after checking its base, length and checksum."""
    from ptcli import manage
    from ptcli import project as proj
    from ptcli.console import emit_json, say

    if tag is not None:
        check_tag(tag)
    p = proj.load(project)
    if fmt is None:
        fmt = Format.peft if source != "-" and Path(source).is_dir() else Format.ptcli
    if fmt is Format.peft:
        from ptcli import peft_io

        result = peft_io.import_adapter(p, Path(source), tag)
    else:
        name, blob = manage.read_source(source)
        result = manage.import_bytes(p, name, blob, tag)
    for w in result.warnings:
        say(f"warning: {w}", quiet, style="yellow")
    if as_json:
        emit_json(dataclasses.asdict(result))
    say(f"imported {result.tag!r} from {result.source} into {result.path}", quiet)


def main() -> None:
    app()
