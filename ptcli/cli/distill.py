"""`ptcli distill`, registered on the app by cli/app.py after tune: a long prompt text into the tag's soft prompt."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ptcli.cli import options as opt
from ptcli.cli.options import handled, tag_flag, task_options
from ptcli.config import BaseOptions, check_tag, check_tune_flags
from ptcli.enums import Dtype
from ptcli.errors import UsageError

app = typer.Typer()  # cli/app.py copies this command onto its app

# tune's flags that mean nothing here: the inputs are --inputs, the init text is the teacher text, the loss is the
# KL to the teacher, and the teacher text sits at the input, where a late or deep prompt does not
NOT_DISTILL = ("train", "valid", "init_text", "answer_only", "loss", "prompt_layer", "deep")

DistillTag = Annotated[
    str,
    tag_flag("Task tag whose prompt learns to act as the teacher text does.", metavar="<str>"),
]
FromText = Annotated[
    str | None,
    typer.Option(
        "--from-text", metavar="<str>", help="The teacher text: an instruction, a system prompt, worked examples."
    ),
]
FromFile = Annotated[
    Path | None,
    typer.Option("--from-file", metavar="<path>", help="Read the teacher text from this file (UTF-8)."),
]
Inputs = Annotated[
    str,
    typer.Option(
        "--inputs",
        metavar="<str>",
        help="Unlabelled rows, jsonl ({prompt_tag, text}; an answer field is ignored); '-' reads stdin.",
    ),
]
Valid = Annotated[
    str | None,
    typer.Option(
        "--valid",
        metavar="<str>",
        help="Held-out rows the best step is kept by (agreement with the teacher).  "
        "[default: the last tenth of --inputs, at most 200 rows]",
        show_default=False,
    ),
]
MaxNew = Annotated[
    int, typer.Option("--max-new-tokens", help="Tokens of the teacher's greedy answer the student learns per row.")
]
TopK = Annotated[
    int,
    typer.Option(
        "--top-k",
        help="Tokens of each teacher distribution kept (the rest is one bucket); 0 keeps the whole vocabulary.",
    ),
]

Temperature = Annotated[
    float,
    typer.Option(
        "--temperature",
        help="Sample the teacher's answers on the inputs at this temperature (seeded by --seed); 0 takes its greedy "
        "answers. Held-out rows are always answered greedily: agreement is scored against those.",
    ),
]


def teacher_text(from_text: str | None, from_file: Path | None) -> str:
    """The teacher text from exactly one of --from-text and --from-file."""
    if (from_text is None) == (from_file is None):
        raise UsageError("give the teacher text with exactly one of --from-text and --from-file")
    if from_file is None:
        assert from_text is not None
        return from_text
    try:
        return from_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--from-file {from_file}: cannot read it ({e})") from e


@app.command()
@handled
@functools.partial(task_options, skip=NOT_DISTILL)
def distill(
    tag: DistillTag,
    inputs: Inputs,
    from_text: FromText = None,
    from_file: FromFile = None,
    valid: Valid = None,
    max_new_tokens: MaxNew = 16,
    top_k: TopK = 64,
    temperature: Temperature = 0.0,
    resume: opt.Resume = False,
    auto_resume: opt.AutoResume = False,
    overwrite: opt.Overwrite = False,
    devices: opt.Devices = 1,
    dtype: opt.DtypeOpt = Dtype.FLOAT32,
    trust_remote_code: opt.TrustOpt = False,
    project: opt.ProjectOpt = None,
    as_json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
    **settings: Any,
) -> None:
    """Distill a long prompt text into the tag's soft prompt, on unlabelled inputs; keep the best by agreement.

    The base with the text where the prompt goes is the teacher; the prompt learns the teacher's answers (the KL to
    its next-token distributions), so each row then carries the prompt's few vectors instead of the whole text."""
    from ptcli import dist, preempt
    from ptcli.api import Project
    from ptcli.cli.console import TuneReporter, report_tuned
    from ptcli.project import manifest as proj
    from ptcli.project.storage import is_main_process

    check_tag(tag)
    text = teacher_text(from_text, from_file)
    p = proj.load(project)
    check_tune_flags(p.num_prompt_tokens, None, devices, False, dist.in_launched_run())
    if dist.relaunched(devices, sys.argv[1:]):
        return
    with preempt.on_sigterm():
        result = Project(p).distill(
            tag,
            text,
            inputs,
            valid=valid,
            max_new_tokens=max_new_tokens,
            top_k=top_k,
            temperature=temperature,
            reporter=TuneReporter(tag, quiet or not is_main_process()),
            resume="auto" if auto_resume else resume,
            overwrite=overwrite,
            base=BaseOptions(dtype, trust_remote_code),
            **settings,
        )
    if is_main_process():
        report_tuned([result], as_json, quiet, verb="distilled")
    dist.exit_launched_worker()
