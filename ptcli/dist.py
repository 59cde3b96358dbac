"""Multi-process launch through accelerate. `ptcli tune --devices N` re-runs itself under
`accelerate launch`; inside, train.py's Accelerator picks up the process group."""

from __future__ import annotations

import os
import subprocess
import sys


def in_launched_run() -> bool:
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def relaunch(devices: int, argv: list[str]) -> int:
    """Run `ptcli ARGV` under accelerate with N processes (on CPU with gloo when no GPU); return its exit code.

    A process that dies makes the launcher stop the others and exit non-zero; the bank is
    written only by the main process at the very end, so a failed run leaves it as it was.
    """
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(devices), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if not torch.cuda.is_available():
        cmd.append("--cpu")
    elif devices > 1:
        cmd.append("--multi_gpu")
    cmd += ["-m", "ptcli", *argv]
    return subprocess.call(cmd)
