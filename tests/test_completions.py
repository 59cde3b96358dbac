"""Shell completion: `completions/` is what the app generates, and tags complete from the project.

No model here: a project is a manifest plus bank file names, which is all completion reads.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ptcli.cli.app import app
from ptcli.cli.options import _complete_bank_tags, _complete_task_tags
from ptcli.config import TaskConfig
from ptcli.project import manifest as proj

REPO = Path(__file__).resolve().parents[1]
SHELLS = ("bash", "zsh", "fish")
runner = CliRunner()


def _generate(shell: str) -> str:
    result = runner.invoke(app, [], env={"_PTCLI_COMPLETE": f"source_{shell}"}, prog_name="ptcli")
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_scripts_match_the_app(shell: str) -> None:
    committed = (REPO / "completions" / f"ptcli.{shell}").read_text(encoding="utf-8")
    assert committed == _generate(shell), (
        f"regenerate it: _PTCLI_COMPLETE=source_{shell} ptcli > completions/ptcli.{shell}"
    )


def test_the_installed_command_generates_the_same_script() -> None:
    exe = Path(sys.executable).with_name("ptcli")
    if not exe.is_file():
        pytest.skip("no ptcli console script next to this Python")
    proc = subprocess.run(
        [str(exe)], env={"_PTCLI_COMPLETE": "source_bash", "PATH": ""}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _generate("bash")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with `sent` and `topic` in the bank and `draft` only recorded by add-task."""
    root = tmp_path / "p"
    p = proj.create(root, proj.BaseInfo(ref="base", fingerprint="0" * 64, hidden_size=8, model_type="llama"), 4)
    for tag in ("sent", "topic"):
        (p.bank_dir / f"{tag}.safetensors").write_bytes(b"")  # completion reads names only
    (p.bank_dir / ".sent.safetensors.123.tmp").write_bytes(b"")  # an atomic write in flight is not a tag
    p.record_task("draft", TaskConfig(train="t.jsonl", valid="v.jsonl"))
    return root


def test_callbacks_return_the_projects_tags(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = SimpleNamespace(params={"project": project})
    assert _complete_bank_tags(ctx, "") == ["sent", "topic"]
    assert _complete_bank_tags(ctx, "t") == ["topic"]
    assert _complete_task_tags(ctx, "") == ["draft", "sent", "topic"]
    monkeypatch.chdir(project / "bank")  # no --project: found from the cwd, as commands do
    assert _complete_bank_tags(SimpleNamespace(params={}), "s") == ["sent"]
    monkeypatch.chdir(tmp_path)  # outside any project: nothing, and no error
    assert _complete_bank_tags(SimpleNamespace(params={}), "") == []
    assert _complete_task_tags(SimpleNamespace(params={"project": tmp_path / "nowhere"}), "") == []


def _bash(line: str) -> list[str]:
    words = line.split(" ")
    env = {"_PTCLI_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
    result = runner.invoke(app, [], env=env, prog_name="ptcli")
    assert result.exit_code == 0, result.output
    return result.stdout.split()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("ptcli show -p {root} ", ["sent", "topic"]),
        ("ptcli show --project {root} t", ["topic"]),
        ("ptcli export -p {root} ", ["sent", "topic"]),
        ("ptcli rename-tag -p {root} ", ["draft", "sent", "topic"]),
        ("ptcli remove-tag -p {root} d", ["draft"]),
        ("ptcli tune -p {root} --tag ", ["draft", "sent", "topic"]),
    ],
)
def test_bash_completes_tags(project: Path, line: str, expected: list[str]) -> None:
    assert _bash(line.format(root=project)) == expected


def test_tags_complete_from_the_cwd(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    assert _bash("ptcli show ") == ["sent", "topic"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_complete_tags(project: Path, shell: str) -> None:
    env = {
        "_PTCLI_COMPLETE": f"complete_{shell}",
        "_TYPER_COMPLETE_ARGS": f"ptcli show -p {project} ",
        "_TYPER_COMPLETE_FISH_ACTION": "get-args",
    }
    result = runner.invoke(app, [], env=env, prog_name="ptcli")
    assert result.exit_code == 0, result.output
    assert "sent" in result.stdout and "topic" in result.stdout
