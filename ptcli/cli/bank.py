"""Commands that manage the bank: list-tags, show, remove-tag, rename-tag, and (from cli/transfer.py) export and
import.

They are registered on the app by cli/app.py, after the core commands (the order of `--help`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ptcli.cli.options import (
    BankTag,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    _complete_task_tags,
    handled,
    json_flag,
)

app = typer.Typer()  # cli/app.py copies these commands onto its app


@app.command("list-tags")
@handled
def list_tags(project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
    """The prompts in the bank: length, infer mode, steps, best validation metric, init, created."""
    from ptcli.cli.console import emit_json, err
    from ptcli.project import bank
    from ptcli.project import manifest as proj

    p = proj.load(project)
    entries = [bank.read_meta(p, t) for t in bank.tags(p)]
    if as_json:
        emit_json(
            [
                {
                    "tag": e.tag,
                    "mode": e.record.answer_mode,
                    **{
                        k: getattr(e.record, k)
                        for k in ("num_prompt_tokens", "steps", "best_step", "metrics", "init", "created", "updated")
                    },
                }
                for e in entries
            ]
        )
        return
    from rich.table import Table

    table = Table(
        "tag", "tokens", "mode", "steps", "val_acc", "val_loss", "init", "created", title=f"prompt bank of {p.root}"
    )
    for e in entries:
        m, steps = e.record.metrics, e.record.steps
        table.add_row(
            e.tag,
            str(e.record.num_prompt_tokens),
            e.record.answer_mode,
            "-" if steps is None else str(steps),
            f"{m.get('val_acc', float('nan')):.3f}",
            f"{m.get('val_loss', float('nan')):.4f}",
            str(e.record.init),
            str(e.record.created),
        )
    err.print(table)


@app.command()
@handled
def show(
    tag: BankTag,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also write the training and validation curves to this PNG file.")
    ] = None,
    project: ProjectOpt = None,
    as_json: Annotated[bool, json_flag("Write the record and the curves to stdout as JSON.")] = False,
) -> None:
    """A prompt's settings, metrics and base (from its bank header) and its training/validation curves."""
    from ptcli.cli.console import emit_json, say, show_prompt
    from ptcli.project import manifest as proj
    from ptcli.project import report

    p = proj.load(project)
    shown = report.show(p, tag)
    if plot is not None:  # first, so that a failure leaves no half-made report
        report.plot(tag, shown.curves, plot, shown.record.best_step)
    if as_json:
        c = shown.curves
        emit_json(
            {
                "tag": tag,
                "path": shown.path,
                "checksum_ok": shown.checksum_ok,
                "mode": shown.record.answer_mode,
                "record": shown.record.to_json(),
                "curves": {"train": c.train, "valid": c.valid, "source": c.source},
            }
        )
    else:
        show_prompt(shown)
    if plot is not None:
        say(f"wrote {plot}")


@app.command("remove-tag")
@handled
def remove_tag(
    tag: Annotated[
        str,
        typer.Argument(
            help="Tag to remove: its prompt, its run history, its recorded settings.",
            autocompletion=_complete_task_tags,
        ),
    ],
    keep_task: Annotated[
        bool,
        typer.Option(
            "--keep-task", help="Keep the settings add-task/tune recorded, so `tune --tag TAG` can retune it."
        ),
    ] = False,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Delete a tag from the project: bank/TAG.safetensors, runs/TAG/ and (unless --keep-task) its recorded settings."""
    from ptcli.cli.console import emit_json, say
    from ptcli.project import manage
    from ptcli.project import manifest as proj

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
    from ptcli.cli.console import emit_json, say
    from ptcli.project import manage
    from ptcli.project import manifest as proj

    result = manage.rename_tag(proj.load(project), old, new)
    if as_json:
        emit_json(dataclasses.asdict(result))
    say(
        f"renamed {old!r} to {new!r}" + (f"; rows with prompt_tag {old!r} must now say {new!r}" if result.path else ""),
        quiet,
    )


# export and import move prompts in and out of the bank (cli/transfer.py); they follow the commands above in --help.
from ptcli.cli import transfer  # noqa: E402

app.registered_commands += transfer.app.registered_commands
