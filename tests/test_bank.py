"""The prompt bank: round trips, header-only reads, corruption, planted pickles, compatibility, atomic writes.

Projects here are made with `project.create` and a made-up base, so no model is loaded.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptcli.errors import CompatibilityError, ProjectError
from ptcli.project import bank
from ptcli.project import manifest as proj
from ptcli.project.record import PromptRecord

H = 8
P = 4


def _project(
    root: Path, fingerprint: str = "a" * 64, hidden: int = H, n: int = P, ref: str = "base-a"
) -> proj.ProjectDir:
    return proj.create(root, proj.BaseInfo(ref=ref, fingerprint=fingerprint, hidden_size=hidden, model_type="llama"), n)


def _prompt(seed: int = 0, n: int = P, h: int = H) -> torch.Tensor:
    return torch.randn(n, h, generator=torch.Generator().manual_seed(seed))


META = {
    "init": "text",
    "init_text": "yes no",
    "metrics": {"val_acc": 0.75, "val_loss": 1.5},
    "config": {"lr": 0.03, "seed": 1},
    "steps": 12,
}


@pytest.fixture
def project(tmp_path: Path) -> proj.ProjectDir:
    return _project(tmp_path / "proj")


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_put_get_round_trip(project: proj.ProjectDir) -> None:
    prompt = _prompt()
    path = bank.put(project, "sent", prompt, PromptRecord.from_json(META))
    assert path == project.bank_dir / "sent.safetensors"
    got, meta = bank.get(project, "sent")
    assert got.dtype == torch.float32 and torch.equal(got, prompt)
    assert {k: meta.to_json()[k] for k in META} == META
    assert meta.tag == "sent" and meta.num_prompt_tokens == P and meta.hidden_size == H
    assert meta.base_fingerprint == project.base.fingerprint and meta.base_ref == project.base.ref
    assert len(meta.sha256) == 64


def test_put_stores_float32(project: proj.ProjectDir) -> None:
    prompt = _prompt().to(torch.bfloat16)
    bank.put(project, "half", prompt, PromptRecord())
    got, _ = bank.get(project, "half")
    assert got.dtype == torch.float32 and torch.equal(got, prompt.float())


def test_put_overwrites(project: proj.ProjectDir) -> None:
    bank.put(project, "sent", _prompt(0), PromptRecord(steps=1))
    bank.put(project, "sent", _prompt(1), PromptRecord(steps=2))
    got, meta = bank.get(project, "sent")
    assert torch.equal(got, _prompt(1)) and meta.steps == 2


def test_read_meta_needs_only_the_header(project: proj.ProjectDir) -> None:
    path = bank.put(project, "sent", _prompt(), PromptRecord.from_json(META))
    full = bank.read_meta(project, "sent")
    assert full.tag == "sent" and full.path == path
    _, meta = bank.get(project, "sent")
    assert full.record == meta
    # cut the tensor bytes off: the header alone still reads, the prompt no longer loads
    path.write_bytes(path.read_bytes()[: 8 + _header_len(path)])
    assert bank.read_meta(project, "sent").record == meta
    with pytest.raises(CompatibilityError):
        bank.get(project, "sent")


def test_listing_does_not_import_torch(project: proj.ProjectDir) -> None:
    bank.put(project, "sent", _prompt(), PromptRecord.from_json(META))
    code = (
        "import sys, pathlib; from ptcli.project import bank, manifest; p = manifest.load(pathlib.Path(sys.argv[1]));"
        "e = [bank.read_meta(p, t) for t in bank.tags(p)]; assert [x.tag for x in e] == ['sent'], e;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code, str(project.root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_corrupted_tensor_byte_refused(project: proj.ProjectDir) -> None:
    path = bank.put(project, "sent", _prompt(), PromptRecord.from_json(META))
    blob = bytearray(path.read_bytes())
    blob[8 + _header_len(path) + 5] ^= 0x01  # one bit of the tensor data
    path.write_bytes(bytes(blob))
    with pytest.raises(CompatibilityError) as info:
        bank.get(project, "sent")
    assert "corrupted" in info.value.message and str(path) in info.value.message


@pytest.mark.parametrize("keep", ["5 bytes", "half the header", "half the data"])
def test_truncated_file_refused(project: proj.ProjectDir, keep: str) -> None:
    path = bank.put(project, "sent", _prompt(), PromptRecord.from_json(META))
    blob, n = path.read_bytes(), _header_len(path)
    cut = {"5 bytes": 5, "half the header": 8 + n // 2, "half the data": 8 + n + (len(blob) - 8 - n) // 2}[keep]
    path.write_bytes(blob[:cut])
    with pytest.raises(CompatibilityError, match=str(path)):
        bank.get(project, "sent")
    if cut < 8 + n:
        with pytest.raises(CompatibilityError, match="truncated"):
            bank.read_meta(project, "sent")


class _Plant:
    """Unpickling this creates the file at `marker`: the payload a malicious prompt file would carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_planted_pickle_is_refused_and_never_run(project: proj.ProjectDir, tmp_path: Path, writer: str) -> None:
    # the payload is live: unpickling it does create its marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Plant(probe))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    evil = project.bank_dir / "evil.safetensors"
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(_Plant(marker)))
    else:
        torch.save({"prompt": _Plant(marker)}, evil)
    assert bank.tags(project) == ["evil"]
    with pytest.raises(CompatibilityError):
        bank.get(project, "evil")
    with pytest.raises(CompatibilityError):
        bank.read_meta(project, "evil")
    assert not marker.exists()


def test_foreign_safetensors_file_refused(project: proj.ProjectDir) -> None:
    from safetensors.torch import save_file

    save_file({"prompt": _prompt()}, str(project.bank_dir / "plain.safetensors"))  # a valid file, but not ptcli's
    for read in (bank.get, bank.read_meta):
        with pytest.raises(CompatibilityError, match="is not a ptcli prompt"):
            read(project, "plain")


def test_prompt_from_another_base_refused(tmp_path: Path) -> None:
    a = _project(tmp_path / "a", fingerprint="a" * 64, ref="base-a")
    b = _project(tmp_path / "b", fingerprint="b" * 64, ref="base-b")
    shutil.copy(bank.put(a, "sent", _prompt(), PromptRecord.from_json(META)), b.bank_dir / "sent.safetensors")
    with pytest.raises(CompatibilityError) as info:
        bank.get(b, "sent")
    msg = info.value.message
    assert "'base-a'" in msg and "a" * 12 in msg and "'base-b'" in msg and "b" * 12 in msg
    assert "base model it was tuned on" in info.value.hint


def test_prompt_with_other_hidden_size_refused(tmp_path: Path) -> None:
    a = _project(tmp_path / "a", hidden=H)
    b = _project(tmp_path / "b", hidden=2 * H)  # same fingerprint, other width
    shutil.copy(bank.put(a, "sent", _prompt(), PromptRecord.from_json(META)), b.bank_dir / "sent.safetensors")
    with pytest.raises(CompatibilityError) as info:
        bank.get(b, "sent")
    assert f"hidden size {H})" in info.value.message and f"hidden size {2 * H})" in info.value.message


def test_prompt_with_other_length_refused(project: proj.ProjectDir) -> None:
    bank.put(project, "short", _prompt(n=P - 1), PromptRecord.from_json(META))
    with pytest.raises(CompatibilityError) as info:
        bank.get(project, "short")
    assert info.value.message == f"prompt 'short' has {P - 1} prompt tokens; this project uses {P}"


def test_unknown_tag_lists_known_tags(project: proj.ProjectDir) -> None:
    with pytest.raises(ProjectError, match="unknown tag 'x'; known tags: none yet"):
        bank.get(project, "x")
    bank.put(project, "beta", _prompt(), PromptRecord())
    bank.put(project, "alpha", _prompt(), PromptRecord())
    with pytest.raises(ProjectError) as info:
        bank.get(project, "gamma")
    assert info.value.message == "unknown tag 'gamma'; known tags: alpha, beta"
    assert "ptcli tune" in info.value.hint


def test_atomic_writes_leave_no_temp_files(project: proj.ProjectDir) -> None:
    for seed in range(3):
        bank.put(project, "alpha", _prompt(seed), PromptRecord())
        bank.put(project, "beta", _prompt(seed), PromptRecord())
    assert sorted(os.listdir(project.bank_dir)) == ["alpha.safetensors", "beta.safetensors"]
    assert bank.tags(project) == ["alpha", "beta"]


def test_failed_write_keeps_the_old_file(project: proj.ProjectDir, monkeypatch: pytest.MonkeyPatch) -> None:
    path = bank.put(project, "alpha", _prompt(0), PromptRecord())
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(ProjectError) as info:
        bank.put(project, "alpha", _prompt(1), PromptRecord())
    assert info.value.message == f"no space left on device: {path}; nothing was changed"
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(project.bank_dir) == ["alpha.safetensors"]
