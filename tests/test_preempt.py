"""Preemption-safe runs: one command for a job's first launch and its relaunches, SIGTERM, and refused resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clihelp import cli, failed, ok

from ptcli.project import bank, runs
from ptcli.project import manifest as proj

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ROWS = [
    ("i love it", "positive"),
    ("i hate it", "negative"),
    ("i adore this", "positive"),
    ("i loathe the phone", "negative"),
]


LONG = 400  # steps: long enough (a few seconds) that a SIGTERM sent once training has begun lands mid-run


def _args(data: Path, steps: int = 12) -> list[str]:
    return [
        "tune",
        "--tag",
        "sent",
        "--train",
        str(data),
        "--valid",
        str(data),
        "--max-steps",
        str(steps),
        "--val-check-interval",
        "4",
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        "--lr",
        "0.1",
        "--seed",
        "5",
        "--auto-resume",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sent.jsonl"
    path.write_text("".join(json.dumps({"prompt_tag": "sent", "text": t, "answer": a}) + "\n" for t, a in ROWS))
    return path


@pytest.fixture(scope="module")
def empty(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> Path:
    root = tmp_path_factory.mktemp("empty") / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", 4, "-q"))
    return root


@pytest.fixture(scope="module")
def finished(empty: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """--auto-resume on a project with no checkpoint starts afresh: the uninterrupted run."""
    root = Path(shutil.copytree(empty, tmp_path_factory.mktemp("ref") / "p"))
    ok(cli(*_args(data, steps=LONG), "-p", root, "-q"))
    return root


@pytest.fixture(scope="module")
def reference(finished: Path) -> torch.Tensor:
    return bank.get(proj.load(finished), "sent")[0]


@pytest.mark.slow  # `finished` tunes 400 steps
def test_a_relaunch_after_the_run_finished_does_nothing(finished: Path, data: Path) -> None:
    before = (finished / "bank" / "sent.safetensors").read_bytes()
    result = cli(*_args(data, steps=LONG), "-p", finished, "--json")
    ok(result)
    assert "already tuned with these settings and data: nothing to do" in result.stderr
    assert json.loads(result.stdout)["steps"] == LONG
    err = failed(cli(*_args(data, steps=LONG), "--lr", "0.3", "-p", finished), 1)
    assert "'sent' is already tuned, with other settings or data" in err
    assert (finished / "bank" / "sent.safetensors").read_bytes() == before


@pytest.mark.slow  # a tune subprocess, stopped and resumed; and `reference` tunes 400 steps
def test_sigterm_checkpoints_exits_75_and_the_same_command_resumes(
    empty: Path, data: Path, reference: torch.Tensor, tmp_path: Path
) -> None:
    root = Path(shutil.copytree(empty, tmp_path / "p"))
    cmd = [sys.executable, "-m", "ptcli", *_args(data, steps=LONG), "-p", str(root)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **ONE_THREAD}, text=True
    )
    for line in proc.stderr:  # the initial validation is done: training has begun
        if line.startswith("step 0:"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped by SIGTERM at step" in err and "--auto-resume" in err
    assert bank.tags(proj.load(root)) == []  # nothing in the bank yet
    record = runs.verify_checkpoint(runs.checkpoint_path(proj.load(root), "sent"))
    assert record["step"] >= 0 and record["inputs"]["dtype"] == "float32"

    assert 0 <= record["step"] < LONG
    # the relaunch: the same command continues, and ends on the uninterrupted prompt
    ok(cli(*_args(data, steps=LONG), "-p", root, "-q"))
    assert torch.allclose(bank.get(proj.load(root), "sent")[0], reference, atol=1e-6, rtol=0)
    assert not runs.checkpoint_path(proj.load(root), "sent").exists()


def _interrupted(empty: Path, data: Path, tmp_path: Path) -> Path:
    """A project whose run of 'sent' was interrupted after its step-4 checkpoint."""
    from reference import tune

    root = Path(shutil.copytree(empty, tmp_path / "p"))
    p = proj.load(root)

    class Stop:
        def status(self, m): ...
        def start(self, total, done): ...
        def evaluated(self, step, metrics, tag=None): ...
        def step(self, step, loss, lr, tokens):
            if step == 6:
                raise KeyboardInterrupt

    from ptcli.config import merge_task

    cfg = merge_task(
        None,
        {
            "train": str(data),
            "valid": str(data),
            "max_steps": 12,
            "val_check_interval": 4,
            "batch_size": 2,
            "max_seq_length": 64,
            "lr": 0.1,
            "seed": 5,
        },
    )
    with pytest.raises(KeyboardInterrupt):
        tune(p, "sent", cfg, Stop())
    assert runs.checkpoint_path(p, "sent").exists()
    return root


def test_resume_with_other_data_or_dtype_is_refused_by_name(empty: Path, data: Path, tmp_path: Path) -> None:
    root = _interrupted(empty, data, tmp_path)
    ckpt = runs.checkpoint_path(proj.load(root), "sent")
    before = ckpt.read_bytes()
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("i love it", "i love it a lot"))
    err = failed(cli(*[str(other) if a == str(data) else a for a in _args(data)], "-p", root), 1)
    assert "the interrupted run used other settings (train, valid, train data of 'sent', valid data of 'sent')" in err
    err = failed(cli(*_args(data), "--dtype", "bfloat16", "-p", root), 1)
    assert "the interrupted run used other settings (dtype)" in err
    assert ckpt.read_bytes() == before  # a refused resume changes nothing


def test_a_damaged_checkpoint_is_named(empty: Path, data: Path, tmp_path: Path) -> None:
    root = _interrupted(empty, data, tmp_path)
    ckpt = runs.checkpoint_path(proj.load(root), "sent")
    blob = bytearray(ckpt.read_bytes())
    blob[-3] ^= 0x10  # one bit of AdamW's state
    ckpt.write_bytes(bytes(blob))
    err = failed(cli(*_args(data), "-p", root), 1)
    assert f"checkpoint {ckpt} is corrupted: its checksum does not match" in err
    ckpt.write_bytes(bytes(blob[:100]))  # cut inside its header
    assert f"checkpoint {ckpt} is unreadable" in failed(cli(*_args(data), "-p", root), 1)
