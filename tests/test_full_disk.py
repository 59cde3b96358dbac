"""A real full disk: a project on a small tmpfs, filled to leave a few pages, under every writing command.

No function is patched here: the kernel refuses the write, wherever it comes. Each command must end
with exit 1 and `no space left on device: PATH` (no traceback), keep every existing file byte for
byte (or, past tune's commit point, say exactly what was saved), leave no temp file, and work once
space is freed. The tune sweep leaves 0, 1, 2, ... pages free so that every write of a run in turn
is the one that fails. Mounting needs root (CI runs as root); elsewhere these tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from clihelp import cli, failed, ok, write_jsonl
from safetensors.torch import load, load_file

from ptcli.project import storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = [("i love it", "positive"), ("i hate it", "negative"), ("i adore this", "positive"), ("i loathe it", "negative")]
PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs hands out whole pages


def _tune(tag: str, data: Path, *extra: object) -> list[object]:
    flags = ["--max-steps", 4, "--val-check-interval", 2, "--batch-size", 2, "--max-seq-length", 64, "--lr", 0.1]
    return ["tune", "--tag", tag, "--train", data, "--valid", data, *flags, "-q", *extra]


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 4 MiB tmpfs of this module's own, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    mnt = tmp_path_factory.mktemp("disk")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        tag: write_jsonl(d / f"{tag}.jsonl", [{"prompt_tag": tag, "text": t, "answer": a} for t, a in ROWS])
        for tag in ("a", "b")
    }


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path, data: dict[str, Path]) -> Path:
    """A project (on an ordinary disk) with tag a tuned; every test copies it onto the small one."""
    root = tmp_path_factory.mktemp("tuned") / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", 4, "-q"))
    ok(cli(*_tune("a", data["a"]), "-p", root))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tuned: Path, data: dict[str, Path]) -> dict:
    """Tag b tuned on a disk with room: the prompt every recovered run must end with."""
    root = Path(shutil.copytree(tuned, tmp_path_factory.mktemp("ref") / "p"))
    ok(cli(*_tune("b", data["b"]), "-p", root))
    return load_file(root / "bank" / "b.safetensors")


@pytest.fixture
def empty(disk: Path) -> Iterator[Path]:
    """The small disk, emptied after the test."""
    yield disk
    _empty(disk)


def _empty(disk: Path) -> None:
    for child in disk.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


@pytest.fixture
def root(empty: Path, tuned: Path) -> Path:
    """The tuned project on the small disk."""
    return Path(shutil.copytree(tuned, empty / "p"))


def _fill(disk: Path, pages: int) -> Path:
    """Leave exactly `pages` pages free on the disk (the filler is `disk/filler`)."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - pages * PAGE))
    st = os.statvfs(disk)
    assert st.f_bavail * st.f_frsize == pages * PAGE
    return filler


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        f.relative_to(root).as_posix(): f.read_bytes()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != ".ptcli.lock"
    }


def _no_temp_files(where: Path) -> None:
    assert [f for f in where.rglob("*") if f.name.endswith(".tmp")] == []


def _refused(result, under: Path) -> tuple[Path, str]:
    """Exit 1 through ptcli's error path with the one full-disk message naming a file under `under`."""
    err = failed(result, 1)
    assert err.startswith("error: no space left on device: "), err
    assert "Traceback" not in err
    path = Path(err.removeprefix("error: no space left on device: ").split(";")[0])
    assert path.is_relative_to(under), err
    return path, err


def _tags(root: Path) -> list[str]:
    result = cli("list-tags", "-p", root, "--json")
    ok(result)
    return [e["tag"] for e in json.loads(result.stdout)]


def _check(root: Path) -> dict:
    result = cli("check", "-p", root, "--json")
    ok(result)
    report = json.loads(result.stdout)
    assert report["problems"] == []
    return report


def _pad_history(root: Path) -> None:
    """Earlier runs fill the history's last page exactly, so that the next line needs a page of its own."""
    history = root / "runs" / "history.jsonl"
    pad = -(history.stat().st_size + len('{"pad": ""}\n')) % PAGE
    with open(history, "a") as f:
        f.write(json.dumps({"pad": "x" * pad}) + "\n")
    assert history.stat().st_size % PAGE == 0


def _after_failure(result, root: Path, before: dict[str, bytes], data: dict[str, Path], reference: dict) -> str:
    """A tune of b that met the full disk: what the message says is what every command sees, tag a's files are as
    they were, nothing is left behind; once the filler is gone, the command the message names ends with the same
    prompt as a run that had room. Returns the path the message names, relative to the project."""
    path, err = _refused(result, root)
    after = _snapshot(root)
    for name, blob in before.items():  # a's prompt and log, the manifest's other lines, the history
        if name == "ptcli.json":
            manifest = json.loads(after[name])
            manifest["tasks"].pop("b", None)  # the run's settings are recorded before its prompt
            assert manifest == {**json.loads(blob), "tasks": manifest["tasks"]}
        elif name == "runs/history.jsonl":
            assert after[name].startswith(blob)
        else:
            assert after[name] == blob, name
    _no_temp_files(root)
    saved = "'b' is saved" in err
    assert ("b" in _tags(root)) == saved
    assert saved or "bank/b.safetensors" not in after
    notes = " ".join(n["message"] for n in _check(root)["notes"])
    assert ("interrupted run of b" in notes) == (root / "runs/b/checkpoint.safetensors").exists()
    (root.parent / "filler").unlink()
    if "--resume" in err:
        ok(cli(*_tune("b", data["b"], "--resume"), "-p", root))
    elif saved:  # past the commit: the prompt is whole, and the next tune says so
        assert "already has a prompt" in failed(cli(*_tune("b", data["b"]), "-p", root), 1)
    else:
        ok(cli(*_tune("b", data["b"]), "-p", root))
    got = load_file(root / "bank" / "b.safetensors")
    assert got.keys() == reference.keys()
    for k in got:
        assert (got[k] - reference[k]).abs().max() <= 1e-6
    assert not (root / "runs/b/checkpoint.safetensors").exists()
    assert _check(root)["notes"] == []
    return path.relative_to(root).as_posix() + " (no checkpoint yet)" * ("no checkpoint yet" in err)


def test_a_tune_on_a_disk_with_little_room(empty: Path, tuned: Path, data: dict[str, Path], reference: dict) -> None:
    """Leave 0, 1, 2, ... pages before the run until it fits: the checkpoint writes are what meet it (the second
    one needs room for two copies, more than any later write)."""
    failed_at = []
    for pages in range(64):
        root = Path(shutil.copytree(tuned, empty / "p"))
        before = _snapshot(root)
        _fill(empty, pages)
        result = cli(*_tune("b", data["b"]), "-p", root)
        if result.exit_code == 0:
            break
        failed_at.append(_after_failure(result, root, before, data, reference))
        _empty(empty)
    else:
        pytest.fail("the run never fitted in 64 pages")
    assert set(failed_at) == {
        "runs/b/checkpoint.safetensors (no checkpoint yet)",  # the first: the run stops with nothing saved
        "runs/b/checkpoint.safetensors",  # a later one: the first is kept for --resume
    }, failed_at


def _tune_filling_at(monkeypatch: pytest.MonkeyPatch, root: Path, at: int | None, pages: int) -> list[str]:
    """Fill the disk to `pages` free pages just before the run's write number `at` opens its file; return the
    files the run opened for writing (the temp file of an atomic write named as its target). Nothing is made to
    fail: the kernel refuses the write that follows."""
    opened: list[str] = []
    real_open = os.open

    def watching(path, flags, *args, **kwargs):
        p = Path(os.fsdecode(path))
        if flags & (os.O_WRONLY | os.O_RDWR) and p.is_relative_to(root) and p.name != ".ptcli.lock":
            if len(opened) == at:
                _fill(root.parent, pages)
            name = p.name[1:].rsplit(".", 2)[0] if p.name.endswith(".tmp") else p.name  # .NAME.RANDOM.tmp
            opened.append((p.parent / name).relative_to(root).as_posix())
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watching)  # tempfile's mkstemp and the history's append both open through it
    return opened


def test_every_write_of_a_tune_in_turn_meets_a_full_disk(
    empty: Path, tuned: Path, data: dict[str, Path], reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills just before each write of the run in turn (no room at all, then one page, which a write of
    more than a page fills part-way): the write that meets it fails, and the run says what it saved."""
    root = Path(shutil.copytree(tuned, empty / "p"))
    writes = _tune_filling_at(monkeypatch, root, None, 0)
    ok(cli(*_tune("b", data["b"]), "-p", root))
    monkeypatch.undo()
    _empty(empty)
    assert writes == [
        "runs/b/checkpoint.safetensors",  # the validation at step 2
        "runs/b/checkpoint.safetensors",  # at step 4, the last
        "ptcli.json",  # b's settings
        "bank/b.safetensors",  # the commit
        "runs/b/metrics.jsonl",
        "runs/history.jsonl",
    ], writes
    for at, target in enumerate(writes):
        for pages in (0, 1):
            root = Path(shutil.copytree(tuned, empty / "p"))
            _pad_history(root)
            before = _snapshot(root)
            _tune_filling_at(monkeypatch, root, at, pages)
            result = cli(*_tune("b", data["b"]), "-p", root)
            monkeypatch.undo()
            if pages == 0 or result.exit_code:
                failed_at = _after_failure(result, root, before, data, reference)
                assert pages or failed_at.startswith(target)
                assert failed_at.split(" ")[0] == target or pages
            _empty(empty)


def test_tags_tuned_together_say_which_prompt_is_saved(
    empty: Path, tuned: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The disk fills between the bank writes of two tags tuned together: the first is saved, the second is
    not, the shared checkpoint stays, and --resume writes both without training again."""
    rows = [{"prompt_tag": tag, "text": t, "answer": a} for tag in ("c", "d") for t, a in ROWS]
    both = write_jsonl(tmp_path / "both.jsonl", rows)
    args = ["tune", "--tag", "c", "--tag", "d", *_tune("c", both)[3:]]
    root = Path(shutil.copytree(tuned, empty / "p"))
    writes = _tune_filling_at(monkeypatch, root, None, 0)
    ok(cli(*args, "-p", root))
    monkeypatch.undo()
    saved = {tag: (root / "bank" / f"{tag}.safetensors").read_bytes() for tag in ("c", "d")}
    _empty(empty)
    root = Path(shutil.copytree(tuned, empty / "p"))
    _tune_filling_at(monkeypatch, root, writes.index("bank/d.safetensors"), 0)
    path, err = _refused(cli(*args, "-p", root), root)
    monkeypatch.undo()
    assert path == root / "bank" / "d.safetensors"
    assert "the prompt of 'c' is saved; the prompt of 'd' is not saved" in err
    assert _tags(root) == ["a", "c"]
    assert "interrupted run of c+d at step 4" in " ".join(n["message"] for n in _check(root)["notes"])
    (empty / "filler").unlink()
    ok(cli(*args, "--resume", "-p", root))
    for tag, blob in saved.items():  # the prompts of the run that had room
        assert torch.equal(load_file(root / "bank" / f"{tag}.safetensors")["prompt"], load(blob)["prompt"])
    _check(root)


def _commands(root: Path, disk: Path, outside: Path) -> dict[str, tuple[list[object], Path]]:
    """Each writing command but tune, with the file its first write goes to."""
    exported = outside / "a.safetensors"
    return {
        "add-task": (["add-task", "a", "--lr", 0.05, "-p", root], root / "ptcli.json"),
        "remove-tag": (["remove-tag", "a", "-p", root, "-q"], root / "ptcli.json"),
        "rename-tag": (["rename-tag", "a", "c", "-p", root, "-q"], root / "bank" / "c.safetensors"),
        "export": (["export", "a", disk / "out.safetensors", "-p", root, "-q"], disk / "out.safetensors"),
        "export-peft": (
            ["export", "a", disk / "peft", "--format", "peft", "-p", root, "-q"],
            disk / "peft" / "adapter_model.safetensors",
        ),
        "export-trtllm": (
            ["export", "a", disk / "trt", "--format", "trtllm", "-p", root, "-q"],
            disk / "trt" / "prompt_table.npy",
        ),
        "import": (["import", exported, "--tag", "d", "-p", root, "-q"], root / "bank" / "d.safetensors"),
    }


@pytest.mark.parametrize(
    "command", ["add-task", "remove-tag", "rename-tag", "export", "export-peft", "export-trtllm", "import"]
)
def test_a_full_disk_stops_a_command_before_it_changes_anything(
    root: Path, disk: Path, tmp_path: Path, command: str
) -> None:
    ok(cli("export", "a", tmp_path / "a.safetensors", "-p", root, "-q"))
    args, first = _commands(root, disk, tmp_path)[command]
    before = _snapshot(disk)
    for pages in range(16):  # a command that writes twice (rename: the prompt, then the manifest) fails at each
        filler = _fill(disk, pages)
        result = cli(*args)
        if result.exit_code == 0:
            break
        path, err = _refused(result, disk)
        assert pages or path == first
        assert "nothing was changed" in err
        filler.unlink()
        assert _snapshot(disk) == before
        _no_temp_files(disk)
        _check(root)
    else:
        pytest.fail(f"{command} never fitted in 16 pages")
    filler.unlink()
    _check(root)


def test_infer_into_a_full_disk_names_the_output_file(root: Path, disk: Path, tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt_tag": "a", "text": t} for t, _ in ROWS * 50])
    before = _snapshot(root)
    out = disk / "out.jsonl"
    filler = _fill(disk, 0)
    with open(out, "wb") as f:
        done = subprocess.run(
            [sys.executable, "-m", "ptcli", "infer", str(rows), "-p", str(root), "-q"], stdout=f, stderr=subprocess.PIPE
        )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert err.startswith(f"error: no space left on device: {out}; the output is incomplete"), err
    assert "Traceback" not in err and "Exception ignored" not in err
    filler.unlink()
    assert _snapshot(root) == before
    with open(out, "wb") as f:
        again = subprocess.run([sys.executable, "-m", "ptcli", "infer", str(rows), "-p", str(root), "-q"], stdout=f)
    assert again.returncode == 0
    assert len(out.read_text().splitlines()) == len(ROWS) * 50
    assert storage.temp_files(root) == []
