"""Resumable tuning state: the prompt, the best prompt so far, AdamW's moments and the step.

Stored as `runs/TAG/checkpoint.safetensors`, a sealed file (project/sealed.py: the tensors, and in
the header a JSON record with a sha256 of the tensor bytes; project/runs.py verifies it), with
the run's inputs (each tag's settings, a hash of each tag's rows, dtype, base fingerprint), so
that a resume with other data or settings is refused by name; written atomically at every
validation and on SIGTERM. The data order is a function of (seed, step) and the frozen base
has no dropout in eval mode, so these are all a resumed run needs to end with the same prompt
as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptcli.config import TaskConfig, computed_settings
from ptcli.errors import ProjectError
from ptcli.project import runs, sealed
from ptcli.project.storage import atomic_write

if TYPE_CHECKING:
    import torch

    from ptcli.tuning.task import Splits


@dataclass
class State:
    """One run's progress; per-tag fields are keyed by tag (a run may tune several tags)."""

    config: dict[str, dict[str, Any]]
    started: str
    step: int = 0
    best_step: dict[str, int] = field(default_factory=dict)
    best: dict[str, dict[str, float]] = field(default_factory=dict)
    initial: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[runs.HistoryRow] = field(default_factory=list)
    seconds: float = 0.0
    inputs: dict[str, Any] = field(default_factory=dict)  # see inputs_of
    best_prompt: torch.Tensor | None = field(default=None, repr=False)  # (S, P, H), every slot of the run
    ema_prompt: torch.Tensor | None = field(default=None, repr=False)  # (S, P, H): --ema's average, None without

    def to_json(self) -> dict[str, Any]:
        """The record a checkpoint stores (the best and average prompts go in as tensors)."""
        kept_apart = ("best_prompt", "ema_prompt", "history")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in kept_apart}
        return {**out, "history": [h.to_json() for h in self.history]}


def inputs_of(rows: Splits, dtype: str, base_fingerprint: str) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one besides the settings: a sha256 of each tag's
    rows per split (the rows, not the file bytes, so stdin works too), dtype and base."""
    data = {}
    for split, by_tag in (("train", rows.train), ("valid", rows.valid)):
        for tag, records in by_tag.items():
            h = hashlib.sha256()
            for r in records:
                h.update(json.dumps([r.tag, r.text, r.answer]).encode() + b"\n")
            data[f"{split} data of {tag!r}"] = h.hexdigest()
    return {**data, "dtype": dtype, "base fingerprint": base_fingerprint}


def save(target: Path, prompt: torch.nn.Module, opt: torch.optim.Optimizer, state: State) -> None:
    """Every trainable tensor of the prompt module (the prompts, and an encoder's weights) with its AdamW moments."""
    assert state.best_prompt is not None  # a run holds its best prompts from the step-0 validation on
    tensors = {"best_prompt": state.best_prompt.cpu().contiguous()}
    if state.ema_prompt is not None:
        tensors["ema_prompt"] = state.ema_prompt.cpu().contiguous()
    steps = {}
    for name, param in prompt.named_parameters():
        tensors[f"param.{name}"] = param.detach().cpu().contiguous()
        adam = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in adam:
                tensors[f"{key}.{name}"] = adam[key].detach().cpu().contiguous()
        if "step" in adam:
            steps[name] = float(adam["step"])
    record = state.to_json()
    record["adam_steps"] = steps
    atomic_write(target, sealed.seal(tensors, record))


def load(
    source: Path,
    prompt: torch.nn.Module,
    opt: torch.optim.Optimizer,
    cfgs: dict[str, TaskConfig],
    inputs: dict[str, Any] | None = None,
) -> State:
    """Restore a verified checkpoint into `prompt` and `opt`.

    One made with other settings or inputs is refused, naming them.
    """
    import torch
    from safetensors.torch import load as st_load

    record = runs.verify_checkpoint(source)
    record.pop("sha256", None)
    tensors = st_load(source.read_bytes())
    given = {tag: computed_settings(cfg) for tag, cfg in cfgs.items()}  # a resumed run may log elsewhere
    default = {f.name: f.default for f in fields(TaskConfig)}  # what a setting newer than the checkpoint meant then
    changed = sorted({k for t, c in given.items() for k in c if record["config"].get(t, {}).get(k, default[k]) != c[k]})
    if "inputs" in record:  # older checkpoints recorded the settings only
        changed += [k for k, v in (inputs or {}).items() if record["inputs"].get(k) != v]
    if changed:
        raise ProjectError(
            f"the interrupted run used other settings ({', '.join(changed)})",
            hint="resume with the same flags and data, or start over with --overwrite",
        )
    if "prompt" in tensors:  # written before encoders: the prompt and its moments under plain names
        tensors = {
            {"prompt": "param.weight", "exp_avg": "exp_avg.weight", "exp_avg_sq": "exp_avg_sq.weight"}.get(k, k): v
            for k, v in tensors.items()
        }
        record["adam_steps"] = {"weight": record.pop("adam_step", 0.0)}
    params = dict(prompt.named_parameters())
    shapes = {n: tuple(t.shape) for n, t in tensors.items() if n.startswith("param.")}
    if shapes != {f"param.{n}": tuple(p.shape) for n, p in params.items()}:
        raise ProjectError(
            f"checkpoint {source} holds other prompt tensors ({shapes}) than this run trains",
            hint="start over with --overwrite",
        )
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
    record["history"] = [runs.row_from_json(h) for h in record.get("history", [])]
    device = params["weight"].device
    ema = tensors["ema_prompt"].to(device) if "ema_prompt" in tensors else None
    return State(**record, best_prompt=tensors["best_prompt"].to(device), ema_prompt=ema)
