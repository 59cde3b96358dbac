"""Two torchrun "nodes" on one machine (the multi-node recipe of docs/launch.md, run as written).

And inference over processes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from clihelp import cli, ok

from ptcli.project import bank, runs
from ptcli.project import manifest as proj

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
LAUNCH_DOC = Path(__file__).resolve().parents[1] / "docs" / "launch.md"
SETTINGS = ["--max-steps", "60", "--val-check-interval", "3", "--batch-size", "8", "--seed", "3", "--lr", "0.1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def project(tiny_llama, tiny_data, tmp_path) -> Path:
    """A project whose task 'sent' is recorded with its settings, so the recipe's short command tunes it."""
    root = tmp_path / "proj"
    ok(cli("init", root, "--base", tiny_llama, "--num-prompt-tokens", 4, "-q"))
    ok(cli("add-task", "sent", "-p", root, "--train", tiny_data.train, "--valid", tiny_data.valid, *SETTINGS, "-q"))
    return root


def recipe() -> list[str]:
    """The multi-node command of docs/launch.md, as words ($R, $HOST, $JOB and the port still to fill in)."""
    text = LAUNCH_DOC.read_text(encoding="utf-8")
    block = re.search(r"```bash\n# on node R[^\n]*\n(torchrun --nnodes 2 .*?)\n```", text, re.S)
    assert block, f"the multi-node recipe (a bash block starting '# on node R') is missing from {LAUNCH_DOC}"
    return shlex.split(block.group(1).replace("\\\n", " "))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(root: Path, port: int, job: str, *extra: str) -> list[subprocess.Popen]:
    procs = []
    for r in (0, 1):
        words = [
            w.replace("$R", str(r)).replace("$HOST:29400", f"127.0.0.1:{port}").replace("$JOB", job) for w in recipe()
        ]
        words = [str(root) if w == "proj" else "sent" if w == "T" else w for w in words]
        assert words[0] == "torchrun" and words[words.index("-p") - 1] == "tune"
        env = {**ENV, "PTCLI_TEST_MARK": f"{job}-{r}"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *words[1:], "-q", *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    """Wait for every launcher; kill any still running at the deadline (nothing may hang)."""
    deadline, out = time.monotonic() + timeout, []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            err += "\n[killed at the test's deadline]"
        out.append((p.returncode, err))
    return out


def _single(project: Path, tmp_path: Path) -> torch.Tensor:
    root = Path(shutil.copytree(project, tmp_path / "single"))
    ok(cli("tune", "-p", root, "--tag", "sent", "-q"))
    return bank.get(proj.load(root), "sent")[0]


@pytest.mark.parametrize("shard", [False, True], ids=["data-parallel", "sharded-base"])
def test_two_nodes_reach_the_one_process_prompt(project: Path, tmp_path: Path, shard: bool) -> None:
    reference = _single(project, tmp_path)
    results = _finish(_nodes(project, _free_port(), uuid.uuid4().hex, *(["--shard-base"] if shard else [])))
    assert [code for code, _ in results] == [0, 0], results
    prompt, meta = bank.get(proj.load(project), "sent")
    assert (prompt - reference).abs().max().item() <= 1e-5
    assert meta.world_size == 2 and meta.steps == 60


def _worker(mark: str) -> int | None:
    """The worker (not the launcher) of one node: it has the node's mark and a RANK."""
    for d in Path("/proc").iterdir():
        try:
            env = set((d / "environ").read_bytes().split(b"\0")) if d.name.isdigit() else set()
        except OSError:
            continue
        if f"PTCLI_TEST_MARK={mark}".encode() in env and any(e.startswith(b"RANK=") for e in env):
            return int(d.name)
    return None


def test_a_killed_node_fails_both_and_the_same_command_resumes(project: Path, tmp_path: Path) -> None:
    reference = _single(project, tmp_path)
    job = uuid.uuid4().hex
    procs = _nodes(project, _free_port(), job)
    ckpt = runs.checkpoint_path(proj.load(project), "sent")
    deadline = time.monotonic() + 180
    while not ckpt.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert ckpt.exists(), _finish(procs, 5)
    victim = _worker(f"{job}-1")
    assert victim, "node 1's worker is not running"
    os.kill(victim, signal.SIGKILL)
    results = _finish(procs, timeout=180)
    assert all(code != 0 for code, _ in results), results
    assert "[killed at the test's deadline]" not in str(results)
    assert bank.tags(proj.load(project)) == [] and ckpt.exists()  # nothing in the bank; the checkpoint survives
    step = runs.verify_checkpoint(ckpt)["step"]

    results = _finish(_nodes(project, _free_port(), uuid.uuid4().hex))  # a relaunch: the same command on both nodes
    assert [code for code, _ in results] == [0, 0], results
    assert 0 < step < 60
    prompt, _ = bank.get(proj.load(project), "sent")
    assert (prompt - reference).abs().max().item() <= 1e-5
    assert not ckpt.exists()


# ---------------------------------------------------------------- inference over processes


@pytest.fixture
def tuned(lively_llama, tiny_data, tmp_path) -> tuple[Path, Path]:
    """A project with a tuned tag on a model whose answers depend on the input, and 23 rows to answer."""
    root = tmp_path / "lively"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", 4, "-q"))
    ok(
        cli(
            "tune",
            "--tag",
            "sent",
            "-p",
            root,
            "--train",
            tiny_data.train,
            "--valid",
            tiny_data.valid,
            "--max-steps",
            4,
            "-q",
        )
    )
    rows = tmp_path / "rows.jsonl"
    texts = [json.loads(line)["text"] for line in tiny_data.train.read_text().splitlines()][:23]
    rows.write_text("".join(json.dumps({"prompt_tag": "sent", "text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return root, rows


@pytest.mark.parametrize("launch", ["torchrun", "--devices"])
def test_infer_over_two_processes_equals_one(tuned: tuple[Path, Path], launch: str) -> None:
    root, rows = tuned
    args = ["infer", str(rows), "-p", str(root), "--batch-size", "4", "--tokens-to-generate", "3"]
    single = cli(*args)
    ok(single)
    if launch == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "ptcli",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "ptcli", *args, "--devices", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout == single.stdout  # every row once, in input order, with the 1-process answers
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == list(range(23))
    assert len({json.loads(line)["prediction"] for line in r.stdout.splitlines()}) > 1  # answers that tell rows apart
