"""`export` and `import`: prompts out of the bank and into it, as ptcli files, PEFT adapters or a TensorRT-LLM table.

cli/bank.py adds these commands to its own, so they follow the other bank commands in `--help`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ptcli.cli.options import JsonOpt, ProjectOpt, QuietOpt, _complete_bank_tags, format_flag, handled, tag_flag
from ptcli.config import check_tag
from ptcli.enums import Dtype, Format
from ptcli.errors import UsageError

if TYPE_CHECKING:
    from ptcli.project.manifest import ProjectDir

app = typer.Typer()  # cli/bank.py copies these commands onto its app


ExportTags = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="TAG",
        help="Tag of a prompt in the bank; trtllm takes several, or none for every tag.",
        autocompletion=_complete_bank_tags,
        show_default=False,
    ),
]
ExportOut = Annotated[
    str,
    typer.Argument(
        metavar="OUT", help="ptcli: a .safetensors file (or a folder, or '-' for stdout). peft, trtllm: a folder."
    ),
]
ExportFormat = Annotated[
    Format,
    format_flag(
        "ptcli: the bank file as is. peft: a PEFT prompt-tuning adapter folder. trtllm: a TensorRT-LLM prompt-table "
        "folder (the .npy table, a tag -> task id map, a README)."
    ),
]
TableDtype = Annotated[
    Dtype | None,
    typer.Option(
        "--dtype",
        help="trtllm: the table's dtype, float16 (the default) or float32; TensorRT-LLM casts it to the engine's.",
        show_default=False,
    ),
]


@app.command()
@handled
def export(
    tags: ExportTags = None,
    out: ExportOut = ...,  # type: ignore[assignment]  # typer: OUT is required, after the optional TAG...
    fmt: ExportFormat = Format.PTCLI,
    dtype: TableDtype = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite what is at OUT.")] = False,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write prompts out of the bank: one self-describing .safetensors file, a PEFT adapter, or a TensorRT-LLM
    prompt table of several tags."""
    from ptcli.cli.console import emit_json, say
    from ptcli.project import manage
    from ptcli.project import manifest as proj

    names = tags or []
    if fmt is not Format.TRTLLM and (len(names) != 1 or dtype is not None):
        raise UsageError(
            f"--format {fmt} exports one tag and takes no --dtype (got {len(names)} tags"
            + (f", --dtype {dtype})" if dtype is not None else ")"),
            hint="name one tag, or use --format trtllm for several",
        )
    p = proj.load(project)
    if fmt is Format.TRTLLM:
        _export_table(p, names, Path(out), dtype or Dtype.FLOAT16, force, as_json, quiet)
        return
    tag = names[0]
    if out == "-":
        _export_stdout(p, tag, fmt, as_json)
        return
    if fmt is Format.PEFT:
        from ptcli.project import peft_adapter

        result = peft_adapter.export(p, tag, Path(out), force)
    else:
        result = manage.export_file(p, tag, Path(out), force)
    if as_json:
        emit_json(dataclasses.asdict(result))
    how = f"; load it with peft.PeftModel.from_pretrained(base, {result.path!r})" if fmt is Format.PEFT else ""
    say(f"exported {tag!r} to {result.path}{how}", quiet)


def _export_stdout(p: ProjectDir, tag: str, fmt: Format, as_json: bool) -> None:
    from ptcli.cli.console import stdout_guard
    from ptcli.project import manage

    if fmt is not Format.PTCLI or as_json:
        raise UsageError("OUT '-' (stdout) takes the ptcli format and no --json")
    if sys.stdout.isatty():
        raise UsageError(
            "refusing to write a binary file to the terminal",
            hint=f"redirect it: ptcli export {tag} - > {tag}.safetensors",
        )
    blob = manage.export_bytes(p, tag)
    with stdout_guard():
        sys.stdout.buffer.write(blob)
        sys.stdout.flush()


def _export_table(
    p: ProjectDir, tags: list[str], out: Path, dtype: Dtype, force: bool, as_json: bool, quiet: bool
) -> None:
    from ptcli.cli.console import emit_json, say
    from ptcli.project import trtllm

    table = trtllm.export(p, tags, out, dtype, force)
    if as_json:
        emit_json(dataclasses.asdict(table))
    say(
        f"exported {', '.join(map(repr, table.tags))} to {table.path} as a {table.dtype} prompt table "
        f"{tuple(table.shape)}; its README.md says how a request names its task (not run on TensorRT-LLM here)",
        quiet,
    )


@app.command("import")
@handled
def import_(
    source: Annotated[
        str,
        typer.Argument(
            metavar="FILE",
            help="A file made by `ptcli export` ('-' reads stdin), a PEFT prompt-tuning adapter folder, or a "
            "TensorRT-LLM folder made by `ptcli export --format trtllm`.",
        ),
    ],
    tag: Annotated[
        str | None,
        tag_flag(
            "Tag in this bank (default: the tag recorded in FILE; required for other PEFT adapters; trtllm: for a "
            "one-task folder only)."
        ),
    ] = None,
    fmt: Annotated[
        Format | None,
        format_flag(
            "Default: trtllm for a folder holding prompt_tasks.json, peft for another folder, ptcli for a file.",
            show_default=False,
        ),
    ] = None,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Add exported prompts, a PEFT prompt-tuning adapter or a TensorRT-LLM export to the bank, after checking
    their base, length and checksum."""
    from ptcli.cli.console import emit_json, say
    from ptcli.project import manage, trtllm
    from ptcli.project import manifest as proj

    if tag is not None:
        check_tag(tag)
    p = proj.load(project)
    folder = source != "-" and Path(source).is_dir()
    if fmt is None:
        fmt = (Format.TRTLLM if trtllm.is_export(Path(source)) else Format.PEFT) if folder else Format.PTCLI
    if fmt is Format.TRTLLM:
        results = trtllm.import_table(p, Path(source), tag)
    elif fmt is Format.PEFT:
        from ptcli.project import peft_adapter

        results = [peft_adapter.import_adapter(p, Path(source), tag)]
    else:
        name, blob = manage.read_source(source)
        results = [manage.import_bytes(p, name, blob, tag)]
    for w in (w for r in results for w in r.warnings):
        say(f"warning: {w}", quiet, style="yellow")
    if as_json:
        records = [dataclasses.asdict(r) for r in results]
        emit_json(records[0] if len(records) == 1 else records)
    for r in results:
        say(f"imported {r.tag!r} from {r.source} into {r.path}", quiet)
