"""What the commands share: option types (each TaskConfig flag with its dataclass help), tag
completion, and the error handler that turns ptcli's errors into exit codes. No torch here.
"""

from __future__ import annotations

import dataclasses
import functools
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ptcli.config import TaskConfig
from ptcli.errors import PtcliError, UsageError

_FIELD_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(TaskConfig)}


def _opt(name: str, *flags: str, **kw: Any) -> Any:
    return typer.Option(*flags, help=_FIELD_HELP[name], show_default=False, **kw)


ProjectOpt = Annotated[
    Path | None,
    typer.Option("--project", "-p", help="Project directory (default: the nearest one at or above the cwd)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Write the result to stdout as JSON.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the base model's own Python code to run.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Precision of the frozen base: float32, bfloat16 or float16.")]
Train = Annotated[str | None, _opt("train", "--train")]
Valid = Annotated[str | None, _opt("valid", "--valid")]
Init = Annotated[str | None, _opt("init", "--init")]
InitText = Annotated[str | None, _opt("init_text", "--init-text")]
AnswerOnly = Annotated[bool | None, _opt("answer_only", "--answer-only/--full-text-loss")]
BatchSize = Annotated[int | None, _opt("batch_size", "--batch-size")]
Lr = Annotated[float | None, _opt("lr", "--lr")]
MinLr = Annotated[float | None, _opt("min_lr", "--min-lr")]
Warmup = Annotated[int | None, _opt("warmup_steps", "--warmup-steps")]
Constant = Annotated[int | None, _opt("constant_steps", "--constant-steps")]
MaxSteps = Annotated[int | None, _opt("max_steps", "--max-steps")]
ValEvery = Annotated[int | None, _opt("val_check_interval", "--val-check-interval")]
MaxSeq = Annotated[int | None, _opt("max_seq_length", "--max-seq-length")]
Seed = Annotated[int | None, _opt("seed", "--seed")]
Grouped = Annotated[bool | None, _opt("group_by_length", "--group-by-length/--no-group-by-length")]
Ensemble = Annotated[int | None, _opt("ensemble", "--ensemble")]
MaxMinutes = Annotated[float | None, _opt("max_minutes", "--max-minutes")]
Template = Annotated[str | None, _opt("template", "--template")]
Reparam = Annotated[str | None, _opt("reparam", "--reparam")]
ReparamLr = Annotated[float | None, _opt("reparam_lr", "--reparam-lr")]


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


def _given(**kw: Any) -> dict[str, Any]:
    return kw


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")


BankTag = Annotated[str, typer.Argument(help="Tag of a prompt in the bank.", autocompletion=_complete_bank_tags)]
