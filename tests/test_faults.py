"""Faults that lose nothing: a full disk mid-write, damaged files, leftover temp files, and `ptcli check`."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clihelp import cli, failed, ok

from ptcli.project import manifest as proj
from ptcli.project import runs, storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = [
    ("i love it", "positive"),
    ("i hate it", "negative"),
    ("i adore this", "positive"),
    ("i loathe the phone", "negative"),
]


def _tune(tag: str, data: Path, *extra) -> list:
    return [
        "tune",
        "--tag",
        tag,
        "--train",
        data,
        "--valid",
        data,
        "--max-steps",
        4,
        "--val-check-interval",
        2,
        "--batch-size",
        2,
        "--max-seq-length",
        64,
        "--lr",
        0.1,
        "-q",
        *extra,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    out = {}
    for tag in ("a", "b"):
        out[tag] = d / f"{tag}.jsonl"
        out[tag].write_text("".join(json.dumps({"prompt_tag": tag, "text": t, "answer": x}) + "\n" for t, x in ROWS))
    return out


@pytest.fixture(scope="module")
def two_tags(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path, data: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("two") / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", 4, "-q"))
    for tag in ("a", "b"):
        ok(cli(*_tune(tag, data[tag]), "-p", root))
    return root


@pytest.fixture
def root(two_tags: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(two_tags, tmp_path / "p"))


def _full_disk_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """fsync of the temp file of `name` fails as on a full disk; every other write goes through."""
    fsync = os.fsync

    def failing(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", failing)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        f.relative_to(root).as_posix(): f.read_bytes()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != ".ptcli.lock"
    }


@pytest.mark.parametrize("target", ["a.safetensors", "checkpoint.safetensors", "ptcli.json"])
def test_a_full_disk_keeps_the_old_file_and_says_so(
    root: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    before = _snapshot(root)
    _full_disk_at(monkeypatch, target)
    if target == "ptcli.json":
        err = failed(cli("add-task", "a", "--lr", 0.05, "-p", root), 1)
        where = root / "ptcli.json"
    else:
        err = failed(cli(*_tune("a", data["a"], "--overwrite"), "-p", root), 1)
        where = root / ("bank/a.safetensors" if target == "a.safetensors" else "runs/a/checkpoint.safetensors")
    monkeypatch.undo()
    assert f"no space left on device: {where}; " in err
    after = _snapshot(root)
    if (
        target == "checkpoint.safetensors"
    ):  # the run died before its first checkpoint: the bank and manifest are as they were
        assert after == before
    else:  # the run's settings reach the manifest before its prompt reaches the bank; the failed file is the old one
        assert {k: v for k, v in after.items() if k in before} == before
    assert storage.temp_files(root) == []
    ok(cli("check", "-p", root, "-q"))


def _corrupt(path: Path, how: str) -> None:
    blob = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(blob[: len(blob) - 7]))
    else:
        blob[-5] ^= 0x01  # one bit of the tensor
        path.write_bytes(bytes(blob))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_prompt_is_named_and_the_other_tags_keep_working(root: Path, tmp_path: Path, how: str) -> None:
    damaged = root / "bank" / "a.safetensors"
    _corrupt(damaged, how)
    rows = {tag: tmp_path / f"{tag}.jsonl" for tag in ("a", "b")}
    for tag, path in rows.items():
        path.write_text(json.dumps({"prompt_tag": tag, "text": "i love it"}) + "\n")
    err = failed(cli("infer", rows["a"], "-p", root), 1)
    assert str(damaged) in err and ("corrupted" in err or "damaged" in err or "truncated" in err)
    ok(cli("infer", rows["b"], "-p", root))
    ok(cli("show", "b", "-p", root))
    ok(cli("export", "b", tmp_path / "b.safetensors", "-p", root, "-q"))

    result = cli("check", "-p", root, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and [f["path"] for f in report["problems"]] == [str(damaged)]
    assert report["checked"] == {"manifest": 1, "prompts": 2, "checkpoints": 0, "logs": 3}
    assert f"problem: {damaged}: " in result.stderr and "error: 1 problem(s)" in result.stderr


@pytest.mark.parametrize("how", ["truncated", "not json"])
def test_a_damaged_manifest_is_named(root: Path, how: str) -> None:
    manifest = root / "ptcli.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2] if how == "truncated" else text.replace('"base"', '"base', 1))
    for args in (["list-tags"], ["show", "a"], ["tune", "--tag", "a"]):
        assert failed(cli(*args, "-p", root), 1).startswith(f"error: cannot read manifest {manifest}")
    result = cli("check", "-p", root, "--json")
    assert result.exit_code == 1 and f"problem: {manifest}: cannot read manifest {manifest}" in result.stderr
    report = json.loads(result.stdout)
    assert [f["path"] for f in report["problems"]] == [str(manifest)]  # the prompts themselves still verify


def test_a_damaged_checkpoint_and_log_are_reported(root: Path, data: dict[str, Path]) -> None:
    ckpt = runs.checkpoint_path(proj.load(root), "a")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    log = root / "runs" / "b" / "metrics.jsonl"
    log.write_bytes(log.read_bytes()[:-9])
    report = json.loads(cli("check", "-p", root, "--json").stdout)
    problems = {f["path"]: f["message"] for f in report["problems"]}
    assert problems[str(ckpt)].startswith(f"checkpoint {ckpt} is unreadable")
    assert problems[str(log)].startswith("1 unreadable line(s):")


def test_leftover_temp_files_are_noted_then_removed_by_the_next_write(root: Path) -> None:
    planted = [
        root / ".ptcli.json.x1.tmp",
        root / "bank" / ".a.safetensors.x2.tmp",
        root / "runs" / "a" / ".checkpoint.safetensors.x3.tmp",
    ]
    for f in planted:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half a file")
    result = cli("check", "-p", root)
    ok(result)  # harmless: notes, not problems
    assert all(f"note: {f}: temporary file of an interrupted write" in result.stderr for f in planted)
    ok(cli("add-task", "a", "--lr", 0.05, "-p", root, "-q"))  # any command that takes the lock
    assert not any(f.exists() for f in planted)
    assert "temporary" not in cli("check", "-p", root).stderr


def test_check_stays_light(root: Path) -> None:
    """`check` reads headers and bytes only: it imports neither torch nor transformers."""
    code = (
        "import sys; from typer.testing import CliRunner; from ptcli.cli.app import app; "
        f"r = CliRunner().invoke(app, ['check', '-p', {str(root)!r}, '--json']); "
        "print(r.exit_code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n")[-2] == "0 []", proc.stdout + proc.stderr
