"""Data-parallel tuning through accelerate, on CPU with gloo (there is no GPU here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ptcli.cli.app import app

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
TUNE = [
    "--tag",
    "sent",
    "--max-steps",
    "6",
    "--val-check-interval",
    "3",
    "--batch-size",
    "8",
    "--seed",
    "3",
    "--lr",
    "0.1",
    "--quiet",
]


@pytest.fixture
def project(tiny_llama, tiny_data, tmp_path) -> Path:
    root = tmp_path / "proj"
    result = CliRunner().invoke(
        app, ["init", str(root), "--base", str(tiny_llama), "--num-prompt-tokens", "4", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        app,
        [
            "add-task",
            "sent",
            "-p",
            str(root),
            "--train",
            str(tiny_data.train),
            "--valid",
            str(tiny_data.valid),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    return root


def _launch(root: Path, *extra: str, processes: int = 2, mark: str = "", quiet: bool = True) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "-m",
        "ptcli",
        "tune",
        "-p",
        str(root),
        *(TUNE if quiet else TUNE[:-1]),
        *extra,
    ]
    env = {**os.environ, "PTCLI_TEST_MARK": mark}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


LATE = ["--template", "suffix", "--prompt-layer", "1", "--loss", "choices"]  # kept states; a sharded base runs whole


@pytest.mark.parametrize(
    ("shard", "late"),
    [(False, []), (True, []), (False, LATE), (True, LATE)],
    ids=["data-parallel", "sharded-base", "late-data-parallel", "late-sharded-base"],
)
def test_two_processes_reach_the_one_process_prompt(project, tmp_path, shard: bool, late: list[str]):
    single = tmp_path / "single"
    shutil.copytree(project, single)
    result = CliRunner().invoke(app, ["tune", "-p", str(single), *TUNE, *late])
    assert result.exit_code == 0, result.output

    proc = _launch(project, "--json", *(["--shard-base"] if shard else []), *late, quiet=not shard)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    if shard:  # the weights really are split: each process holds about half
        share = float(re.search(r"FSDP\): this one holds ([\d.]+)% of its", err).group(1))
        assert 45 <= share <= 55, err
    assert out.count('"tag": "sent"') == 1  # only the main process reports (and writes)
    a = load_file(single / "bank" / "sent.safetensors")["prompt"]
    b = load_file(project / "bank" / "sent.safetensors")["prompt"]
    assert not torch.equal(a, torch.zeros_like(a))
    assert (a - b).abs().max().item() < 1e-5
    assert sorted(p.name for p in (project / "bank").iterdir()) == ["sent.safetensors"]  # no stray temp files
    assert json.loads(_header(project / "bank" / "sent.safetensors"))["world_size"] == 2


def test_devices_flag_launches_accelerate(project):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "ptcli", "tune", "-p", str(project), *TUNE, "--devices", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 6
    meta = json.loads(_header(project / "bank" / "sent.safetensors"))
    assert meta["world_size"] == 2


def _header(path: Path) -> str:
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n])["__metadata__"]["ptcli"]


def _rank_pids(mark: str, rank: str) -> list[int]:
    """Worker processes of one launch (found by an env mark: torchrun gives workers their own session)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = set((d / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if f"PTCLI_TEST_MARK={mark}".encode() in env and f"RANK={rank}".encode() in env:
            pids.append(int(d.name))
    return pids


def test_killing_one_process_fails_cleanly(project):
    """Rank 1 killed in the training loop: the launch fails and the bank is untouched."""
    bank_before = sorted((project / "bank").iterdir())
    mark = uuid.uuid4().hex
    proc = _launch(project, "--max-steps", "100000", "--val-check-interval", "2", mark=mark, quiet=False)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Rank 0 reports each validation, and every rank takes part in the steps and validations before it:
    # once "step 4:" is out, rank 1 has trained four steps and is in the loop.
    deadline = time.monotonic() + 300
    while not any(line.startswith("step 4:") for line in lines) and proc.poll() is None:
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    victims = _rank_pids(mark, "1")
    assert proc.poll() is None and len(victims) == 1, "".join(lines)
    os.kill(victims[0], signal.SIGKILL)
    proc.wait(timeout=300)
    reader.join(60)
    err = "".join(lines)
    assert proc.returncode != 0
    assert re.search(rf"exitcode\s*: -9 \(pid: {victims[0]}\)", err), err  # torchrun: rank 1 died of that kill
    assert sorted((project / "bank").iterdir()) == bank_before  # nothing written
