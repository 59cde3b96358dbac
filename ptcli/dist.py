"""Multi-process launch. `ptcli tune --devices N` re-runs itself with N processes; inside,
tuning/tune.py's Accelerator picks up the process group (NCCL on GPUs, gloo on CPU).

On GPUs this is `accelerate launch --multi_gpu`. On CPU, accelerate's launcher runs a single
process unless MPI is set up, so ptcli uses torchrun (torch.distributed.run), the launcher
accelerate itself wraps for GPUs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

LAUNCHED = "PTCLI_LAUNCHED"


def in_launched_run() -> bool:
    return LAUNCHED in os.environ or "WORLD_SIZE" in os.environ


def launch_command(devices: int, argv: list[str], cuda: bool) -> list[str]:
    if cuda:
        head = [
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(devices),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    else:
        head = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(devices)]
    return [sys.executable, *head, "-m", "ptcli", *argv]


def relaunch(devices: int, argv: list[str]) -> int:
    """Run `ptcli ARGV` with N processes; return the launcher's exit code.

    A process that dies makes the launcher stop the others and exit non-zero; the bank is
    written only by the main process at the very end, so a failed run leaves it as it was.
    A SIGTERM noted by `preempt` is passed on to the launcher, which passes it to the workers;
    they checkpoint and stop, and this raises PreemptedError.
    """
    import torch

    from ptcli import preempt

    env = {**os.environ, LAUNCHED: "1"}
    proc = subprocess.Popen(launch_command(devices, argv, torch.cuda.is_available()), env=env)
    passed_on = False
    while proc.poll() is None:
        if preempt.requested() and not passed_on:
            proc.send_signal(signal.SIGTERM)
            passed_on = True
        time.sleep(0.2)
    if passed_on and proc.returncode:
        raise preempt.stopped(f"(passed on to the {devices} processes, which checkpoint before they stop)")
    return proc.returncode


def shard_frozen_base(model) -> tuple[int, int]:
    """Shard the frozen base over every process with FSDP2 (torch's `fully_shard`), in place.

    ptcli calls the decoder body, the embedding and the head separately (the shared-prompt
    fast path), so each is its own unit: every decoder layer, the embedding with the head
    (one unit when tied: FSDP2 refuses a parameter in two groups), then the body as the
    root for what is left. Every unit gathers its weights for its forward and frees them
    after. Each forward is then a collective: every process must make the same calls.

    Returns (this process's weight bytes, all weight bytes). Not accelerate's FSDP plugin: it runs
    only on GPUs, and its `prepare` wraps the model as one root unit and wants the optimizer's
    parameters inside it, which a prompt held apart from the frozen weights is not.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu" if dist.get_backend() == "gloo" else "cuda", (dist.get_world_size(),))
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": True}  # roots too: FSDP2 keeps roots gathered
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    body = model.base_model
    layers = [m for m in body.modules() if type(m).__name__ in layer_types]
    if not layers:
        from ptcli.errors import ModelError

        raise ModelError(
            f"cannot tell the decoder layers of {type(model).__name__} apart (no _no_split_modules)",
            hint="tune without --shard-base",
        )
    for layer in layers:
        fully_shard(layer, **kw)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        fully_shard([emb, head], **kw)
    else:
        fully_shard(emb, **kw)
        if head is not None:
            fully_shard(head, **kw)
    fully_shard(body, **kw)
    return _param_bytes(model, local=True), _param_bytes(model, local=False)


def _param_bytes(model, local: bool) -> int:
    """Bytes of the model's weights: this process's shards (local) or the whole (shared weights once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            t = p.to_local() if local and hasattr(p, "to_local") else p
            total += t.numel() * t.element_size()
    return total


def join_group():
    """(rank, world size, device) of this process; joins the launcher's process group when there are several.

    For commands that split work without accelerate (infer): NCCL with one GPU per process, or gloo on CPU.
    """
    import torch
    import torch.distributed as tdist

    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order (a collective: every process calls it)."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def relaunched(devices: int, argv: list[str]) -> bool:
    """With --devices N > 1 outside a launched run, run this same command (`argv`) as N processes; True when they
    ran. A failed run is a PtcliError: the bank is unchanged."""
    from ptcli import preempt
    from ptcli.errors import PtcliError

    if devices < 2 or in_launched_run():
        return False
    with preempt.on_sigterm():
        code = relaunch(devices, argv)
    if code:
        raise PtcliError(
            f"the {devices}-process run failed (exit {code}); the bank is unchanged", hint="see the messages above"
        )
    return True


def exit_launched_worker() -> None:
    """End a finished worker of a multi-process run at once, skipping interpreter teardown.

    The work is done and the bank written (atomically, by the main process) when this runs.
    At normal exit, torch's gloo threads are sometimes destroyed while still joinable, and
    the process aborts ("terminate called without an active exception", SIGABRT), which
    would turn a finished run into a failed launch.
    """
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
