"""CLI helpers shared by the test files: run ptcli in-process and check how it ended."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ptcli.cli.app import app

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that help never abbreviates a flag


def cli(*args, input: str | bytes | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\nstderr:\n{result.stderr}\nexception: {result.exception!r}"


def failed(result, code: int) -> str:
    """The exit code is `code`, reached through ptcli's error handling (not a crash); returns stderr."""
    assert result.exit_code == code, (
        f"exit {result.exit_code}\nstderr:\n{result.stderr}\nexception: {result.exception!r}"
    )
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stderr.startswith("error: "), result.stderr
    return result.stderr


def write_jsonl(path, rows: list[dict]):
    """Write rows as JSON Lines; return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
