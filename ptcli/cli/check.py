"""`ptcli check`: the whole project verified, problems listed (stderr, or `--json` on stdout), exit 1 if any."""

from __future__ import annotations

import typer

from ptcli.cli.options import JsonOpt, ProjectOpt, QuietOpt, handled
from ptcli.errors import ProjectError

app = typer.Typer()  # cli/app.py copies this command onto its app


@app.command()
@handled
def check(project: ProjectOpt = None, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Verify the project: manifest, every prompt's checksum and base, checkpoints and run logs. Exit 1 on problems."""
    from ptcli.cli.console import emit_json, say
    from ptcli.project.check import check as run_check

    report = run_check(project)
    if as_json:
        emit_json(report.to_dict())
    for f in report.notes:
        say(f"note: {f.path}: {f.message}", quiet)
    for f in report.problems:
        say(f"problem: {f.path}: {f.message}", quiet, style="red")
    counts = ", ".join(f"{n} {kind}" for kind, n in report.checked.items())
    if report.problems:
        raise ProjectError(
            f"{len(report.problems)} problem(s) in project {report.project} (read {counts})",
            hint="retune or remove a damaged prompt (`ptcli remove-tag TAG`); delete a damaged checkpoint",
        )
    say(f"project {report.project} is sound (read {counts})", quiet)
