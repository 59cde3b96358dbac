"""Multi-process launch. `ptcli tune --devices N` re-runs itself with N processes; inside,
train.py's Accelerator picks up the process group (NCCL on GPUs, gloo on CPU).

On GPUs this is `accelerate launch --multi_gpu`. On CPU, accelerate's launcher runs a single
process unless MPI is set up, so ptcli uses torchrun (torch.distributed.run), the launcher
accelerate itself wraps for GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys

LAUNCHED = "PTCLI_LAUNCHED"


def in_launched_run() -> bool:
    return LAUNCHED in os.environ or "WORLD_SIZE" in os.environ


def launch_command(devices: int, argv: list[str], cuda: bool) -> list[str]:
    if cuda:
        head = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(devices), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        head = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(devices)]
    return [sys.executable, *head, "-m", "ptcli", *argv]


def relaunch(devices: int, argv: list[str]) -> int:
    """Run `ptcli ARGV` with N processes; return the launcher's exit code.

    A process that dies makes the launcher stop the others and exit non-zero; the bank is
    written only by the main process at the very end, so a failed run leaves it as it was.
    """
    import torch

    env = {**os.environ, LAUNCHED: "1"}
    return subprocess.call(launch_command(devices, argv, torch.cuda.is_available()), env=env)
