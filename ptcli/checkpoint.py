"""Resumable tuning state: the prompt, the best prompt so far, AdamW's moments and the step.

Stored as `runs/TAG/checkpoint.safetensors` (tensors) with a JSON record in its header;
written atomically at every validation. The data order is a function of (seed, step) and
the frozen base has no dropout in eval mode, so these are all a resumed run needs to end
with the same prompt as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptcli.config import TaskConfig
from ptcli.errors import ProjectError
from ptcli.project import Project
from ptcli.storage import atomic_write


@dataclass
class State:
    """One run's progress; per-tag fields are keyed by tag (a run may tune several tags)."""

    config: dict[str, dict[str, Any]]
    started: str
    step: int = 0
    best_step: dict[str, int] = field(default_factory=dict)
    best: dict[str, dict[str, float]] = field(default_factory=dict)
    initial: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    best_prompt: torch.Tensor | None = field(default=None, repr=False)  # (S, P, H), every slot of the run


def path(project: Project, tags: list[str] | str) -> Path:
    """runs/TAG/, or runs/A+B/ for tags tuned together ('+' is never part of a tag)."""
    return project.run_dir(tags if isinstance(tags, str) else "+".join(tags)) / "checkpoint.safetensors"


def save(target: Path, prompt: torch.nn.Module, opt: torch.optim.Optimizer, state: State) -> None:
    """Every trainable tensor of the prompt module (the prompts, and an encoder's weights) with its AdamW moments."""
    from safetensors.torch import save as st_save

    tensors = {"best_prompt": state.best_prompt.cpu().contiguous()}
    steps = {}
    for name, param in prompt.named_parameters():
        tensors[f"param.{name}"] = param.detach().cpu().contiguous()
        adam = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in adam:
                tensors[f"{key}.{name}"] = adam[key].detach().cpu().contiguous()
        if "step" in adam:
            steps[name] = float(adam["step"])
    record = {k: v for k, v in asdict(state).items() if k != "best_prompt"}
    record["adam_steps"] = steps
    atomic_write(target, st_save(tensors, metadata={"ptcli": json.dumps(record)}))


def load(source: Path, prompt: torch.nn.Module, opt: torch.optim.Optimizer, cfgs: dict[str, TaskConfig]) -> State:
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt") as f:
            record = json.loads(f.metadata()["ptcli"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ProjectError(f"checkpoint {source} is unreadable ({e})", hint="retune with --overwrite") from e
    given = {tag: cfg.to_dict() for tag, cfg in cfgs.items()}
    if record["config"] != given:
        changed = sorted({k for t, c in given.items() for k in c if record["config"].get(t, {}).get(k) != c[k]})
        raise ProjectError(
            f"the interrupted run used other settings ({', '.join(changed)})",
            hint="resume with the same flags, or start over with --overwrite",
        )
    params = dict(prompt.named_parameters())
    shapes = {n: tuple(t.shape) for n, t in tensors.items() if n.startswith("param.")}
    if shapes != {f"param.{n}": tuple(p.shape) for n, p in params.items()}:
        raise ProjectError(f"checkpoint {source} holds other prompt tensors ({shapes}) than this run trains",
                           hint="start over with --overwrite")
    steps = record.pop("adam_steps", {})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"param.{name}"].to(param.device))
            if f"exp_avg.{name}" in tensors:
                opt.state[param] = {
                    "step": torch.tensor(steps[name]),
                    "exp_avg": tensors[f"exp_avg.{name}"].to(param.device),
                    "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(param.device),
                }
    return State(**record, best_prompt=tensors["best_prompt"].to(prompt.weight.device))


def write_log(project: Project, tag: str, history: list[dict[str, Any]]) -> Path:
    """One tag's metrics, one JSON object per line: the run's training steps and this tag's validations."""
    target = project.run_dir(tag) / "metrics.jsonl"
    mine = [{k: v for k, v in h.items() if k != "tag"} for h in history if h.get("tag", tag) == tag]
    atomic_write(target, "".join(json.dumps(h) + "\n" for h in mine).encode())
    return target


def append_run(project: Project, record: dict[str, Any]) -> Path:
    """One line per finished run in `runs/history.jsonl`, appended (a single O_APPEND write)."""
    target = project.root / "runs" / "history.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return target
