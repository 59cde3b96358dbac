"""What the commands share: option types (the tuning flags derived from TaskConfig's fields), tag
completion, and the error handler that turns ptcli's errors into exit codes. No torch here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ptcli.config import TaskConfig, flag_of
from ptcli.enums import Backend, Dtype, LlamaWeights, Mode
from ptcli.errors import PtcliError

ProjectOpt = Annotated[
    Path | None,
    typer.Option("--project", "-p", help="Project directory (default: the nearest one at or above the cwd)."),
]


def json_flag(help: str) -> Any:
    """`--json`, with what it writes in this command; the flag is spelled here only."""
    return typer.Option("--json", help=help)


def devices_flag(help: str) -> Any:
    return typer.Option("--devices", help=help)


def prompt_tokens_flag(help: str) -> Any:
    return typer.Option("--num-prompt-tokens", help=help)


def tag_flag(help: str, **kw: Any) -> Any:
    return typer.Option("--tag", help=help, **kw)


def format_flag(help: str, **kw: Any) -> Any:
    return typer.Option("--format", help=help, **kw)


JsonOpt = Annotated[bool, json_flag("Write the result to stdout as JSON.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the base model's own Python code to run.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Precision of the frozen base.")]

# init
BaseOpt = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="Base model: a local Hugging Face folder, a .gguf file, or a hub id. Default: SmolLM2-135M-Instruct.",
    ),
]
InitTokens = Annotated[int, prompt_tokens_flag("Soft prompt length, shared by every task in the project.")]
# add-task and tune: the TaskConfig flags come from `task_options` below
TagArg = Annotated[str, typer.Argument(help="Task tag, as in the data's prompt_tag field.")]
TuneTokens = Annotated[int | None, prompt_tokens_flag("Must equal the project's prompt length (set by init).")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted run of this tag from its last checkpoint.")
]
AutoResume = Annotated[
    bool,
    typer.Option(
        "--auto-resume",
        help="Resume if there is a checkpoint, else start afresh: one command for a job's first launch and its "
        "relaunches.",
    ),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Retune a tag that is already in the bank.")]
Devices = Annotated[int, devices_flag("Processes (GPUs, or CPU workers) to tune with, launched through accelerate.")]
ShardBase = Annotated[
    bool,
    typer.Option(
        "--shard-base",
        help="With --devices N: shard the frozen base over the N processes (FSDP), for bases too big for one device.",
    ),
]
# infer
InferFile = Annotated[
    str, typer.Argument(help="jsonl with prompt_tag and text per line (tags may mix); '-' reads stdin.")
]
ModeOpt = Annotated[
    Mode | None,
    typer.Option(
        "--mode",
        help="generate: greedy answers; rank: the likeliest of the tag's answer set (classification). "
        "Default: per tag, the mode its prompt was chosen by (list-tags shows it).",
        show_default=False,
    ),
]
ChoicesOpt = Annotated[
    str | None,
    typer.Option(
        "--choices", help="Comma-separated answer set for --mode rank (default: the answers seen in training)."
    ),
]
Calibrate = Annotated[
    bool,
    typer.Option(
        "--calibrate",
        help="Ranked tags: correct each answer's score by its score after a content-free input ('N/A'), "
        "contextual calibration.",
    ),
]
TokensToGenerate = Annotated[
    int, typer.Option("--tokens-to-generate", help="Most tokens generated per line (stops at end of sequence).")
]
InferBatch = Annotated[int, typer.Option("--batch-size", help="Lines per forward pass.")]
DeviceMap = Annotated[
    str | None,
    typer.Option("--device-map", help="Place a large base across devices, e.g. 'auto' (accelerate big-model loading)."),
]
EngineOpt = Annotated[
    Backend,
    typer.Option(
        "--engine",
        help="torch: ptcli's own forward. llama.cpp: the base's GGUF file in llama.cpp "
        "(pip install 'ptcli[llamacpp]'; prompts at the input only).",
    ),
]
LlamaWeightsOpt = Annotated[
    LlamaWeights,
    typer.Option(
        "--llama-weights",
        help="--engine llama.cpp: the GGUF file's own types, or the file re-encoded once by llama.cpp "
        "(bf16: fastest on CPUs with AVX512-BF16; f32: closest to torch).",
    ),
]
InferDevices = Annotated[int, devices_flag("Processes (GPUs, or CPU workers) that share the rows; output as with one.")]
InferJson = Annotated[bool, json_flag("One JSON document (predictions and accuracy) instead of jsonl lines.")]


def _completion_project(ctx: typer.Context):
    """The project a completion is for: --project if already typed, else the one found from the cwd; None if none."""
    from ptcli.project import manifest as proj

    try:
        return proj.load(ctx.params.get("project"))
    except Exception:  # completion must never fail loudly
        return None


def _complete_bank_tags(ctx: typer.Context, incomplete: str) -> list[str]:
    """Tags in the bank (file names only: no torch, no model), for show and export."""
    from ptcli.project import bank

    p = _completion_project(ctx)
    return [t for t in bank.tags(p) if t.startswith(incomplete)] if p else []


def _complete_task_tags(ctx: typer.Context, incomplete: str) -> list[str]:
    """Tags in the bank or recorded by add-task, for tune --tag, remove-tag and rename-tag."""
    from ptcli.project import bank

    p = _completion_project(ctx)
    return sorted(t for t in set(bank.tags(p)) | set(p.tasks) if t.startswith(incomplete)) if p else []


TuneTag = Annotated[
    list[str],
    tag_flag(
        "Task tag to tune (new, or recorded by add-task); repeat it to tune several tags together over mixed batches.",
        metavar="<str>",
        autocompletion=_complete_task_tags,
    ),
]


def handled(fn):
    """Turn ptcli's errors into a message on stderr and an exit code (1 failure, 2 bad usage or input)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PtcliError as e:
            from ptcli.cli.console import show_error

            show_error(e.message, getattr(e, "problems", []), e.hint)
            raise typer.Exit(e.exit_code) from None

    return wrapper


RECORDED_WINS = (
    "A tuning setting not given here takes the value recorded for the task (by add-task or an earlier tune); "
    "the default shown applies only when none is recorded."
)


def _shown_default(f: dataclasses.Field[Any], flag: str) -> str:
    """How --help states a field's default: the field's own words, a bool's flag, or the value."""
    if f.metadata.get("required"):
        return "[required unless recorded]"
    if "shown" in f.metadata:
        return f"[default: {f.metadata['shown']}]"
    if isinstance(f.default, bool):
        return f"[default: {flag.split('/')[0 if f.default else 1]}]"
    return f"[default: {f.default}]"


def _task_option(f: dataclasses.Field[Any], hint: Any) -> inspect.Parameter:
    """One TaskConfig field as a typer option. Its default is None, meaning "not given", so that a value the project
    recorded for the task can win over the field's default; --help states that default in the text instead."""
    flag = flag_of(f.name)
    kind = f.metadata.get("choices") or next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    if kind is bool:
        flag = f"{flag}/{f.metadata.get('off', '--no-' + flag.removeprefix('--'))}"
    option = typer.Option(flag, help=f"{f.metadata['help']}  {_shown_default(f, flag)}", show_default=False)
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
    )


def task_options(command: Callable[..., None], skip: tuple[str, ...] = ()) -> Callable[..., None]:
    """Give a command one option per TaskConfig field, in place of its `**settings` and right after its first
    parameter (the tag). The dataclass is the schema (name, type, help, default), so a tuning flag is spelled once,
    in config.py; typer reads the signature set here, and the command receives the fields in `settings`.
    skip: fields the command does not take (distill's inputs are its own flag; its init is the teacher text)."""
    sig = inspect.signature(command, eval_str=True)
    first, *rest = (p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD)
    hints = typing.get_type_hints(TaskConfig)
    settings = [_task_option(f, hints[f.name]) for f in dataclasses.fields(TaskConfig) if f.name not in skip]
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rest]
    command.__signature__ = sig.replace(parameters=[first, *settings, *rest])  # type: ignore[attr-defined]
    command.__doc__ = f"{command.__doc__}\n\n{RECORDED_WINS}"
    return command


BankTag = Annotated[str, typer.Argument(help="Tag of a prompt in the bank.", autocompletion=_complete_bank_tags)]
