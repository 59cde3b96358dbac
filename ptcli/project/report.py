"""What `ptcli show` reports about one prompt: its record (from the bank header) and its curves.

The curves come from `runs/TAG/metrics.jsonl`, written at the end of a run: lines
`{"step", "loss", "lr"}` for training steps and `{"step", "val_loss", "val_acc"[, "val_acc_rank"]}` for
validations. The validation before the first step is in the record (`initial_metrics`) and
is drawn as step 0. Nothing here imports torch; matplotlib is imported only to plot.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptcli.config import check_tag
from ptcli.errors import CompatibilityError, ProjectError
from ptcli.project import bank
from ptcli.project.manifest import ProjectDir
from ptcli.project.record import PromptRecord
from ptcli.project.storage import atomic_write

BLOCKS = "▁▂▃▄▅▆▇█"


@dataclass
class Curves:
    train: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", "lr"}; lr is None in old logs
    valid: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_loss", "val_acc"}
    source: str = ""
    skipped: int = 0  # unreadable lines


@dataclass
class Shown:
    tag: str
    path: str
    checksum_ok: bool
    record: PromptRecord
    curves: Curves


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _valid(row: dict[str, Any]) -> dict[str, float]:
    """The validation numbers of a row; val_acc_rank only for tasks with an answer set."""
    return {k: row[k] for k in ("val_loss", "val_acc", "val_acc_rank") if _num(row.get(k))}


def read_curves(project: ProjectDir, tag: str, initial: dict[str, Any] | None = None) -> Curves:
    path = project.run_dir(tag) / "metrics.jsonl"
    curves = Curves(source=str(path))
    if initial and _num(initial.get("val_loss")) and _num(initial.get("val_acc")):
        curves.valid.append({"step": 0, **_valid(initial)})
    if not path.is_file():
        return curves
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            curves.skipped += 1
            continue
        if not isinstance(row, dict) or not _num(row.get("step")):
            curves.skipped += 1
        elif _num(row.get("loss")):
            curves.train.append({"step": row["step"], "loss": row["loss"], "lr": row.get("lr")})
        elif _num(row.get("val_loss")) and _num(row.get("val_acc")):
            if row["step"] != 0 or not curves.valid:  # step 0 is already there, from the record
                curves.valid.append({"step": row["step"], **_valid(row)})
        else:
            curves.skipped += 1
    return curves


def show(project: ProjectDir, tag: str) -> Shown:
    """A prompt's record and curves; the checksum is checked (no torch), not enforced."""
    path = bank.require(project, check_tag(tag))
    record = bank.read_meta(project, tag).record
    try:
        bank.verify(str(path), path.read_bytes())
        ok = True
    except CompatibilityError:
        ok = False
    return Shown(tag, str(path), ok, record, read_curves(project, tag, record.initial_metrics))


def sparkline(values: list[float], width: int = 48) -> str:
    """Values as block characters, low to high; longer series are averaged into `width` bins."""
    values = [v for v in values if _num(v) and math.isfinite(v)]
    if not values:
        return ""
    if len(values) > width:
        bins = [values[i * len(values) // width : (i + 1) * len(values) // width] for i in range(width)]
        values = [sum(b) / len(b) for b in bins]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return BLOCKS[len(BLOCKS) // 2 - 1] * len(values)
    return "".join(BLOCKS[min(len(BLOCKS) - 1, int((v - lo) / (hi - lo) * len(BLOCKS)))] for v in values)


def plot(tag: str, curves: Curves, out: Path, best_step: int | None = None) -> Path:
    """PNG of loss and val_loss against step, val_acc on a second axis, titled with the tag; the kept step marked."""
    if not curves.train and len(curves.valid) < 2:
        raise ProjectError(
            f"no curves to plot for {tag!r}: {curves.source} does not exist or holds no steps",
            hint="it is written when `ptcli tune` finishes; imported prompts have none",
        )
    try:
        from matplotlib.figure import Figure  # a Figure renders through Agg on its own: no pyplot, no GUI backend
    except ImportError:
        raise ProjectError("--plot needs matplotlib, which is not installed", hint="pip install matplotlib") from None

    fig = Figure(figsize=(7, 4), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    lines = []
    if curves.train:
        lines += ax.plot(
            [r["step"] for r in curves.train],
            [r["loss"] for r in curves.train],
            color="tab:blue",
            lw=1.2,
            label="loss (train)",
        )
    if curves.valid:
        steps = [r["step"] for r in curves.valid]
        lines += ax.plot(steps, [r["val_loss"] for r in curves.valid], "o-", color="tab:orange", ms=4, label="val_loss")
        acc = ax.twinx()
        lines += acc.plot(steps, [r["val_acc"] for r in curves.valid], "s--", color="tab:green", ms=4, label="val_acc")
        if all("val_acc_rank" in r for r in curves.valid):
            lines += acc.plot(
                steps, [r["val_acc_rank"] for r in curves.valid], "^:", color="tab:red", ms=4, label="val_acc_rank"
            )
        acc.set_ylabel("val_acc")
        acc.set_ylim(-0.03, 1.03)
    if best_step is not None and (curves.train or curves.valid):
        lines.append(ax.axvline(best_step, color="grey", ls=":", lw=1, label=f"kept (step {best_step})"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token")
    ax.grid(alpha=0.3)
    ax.legend(handles=lines, labels=[str(ln.get_label()) for ln in lines], loc="center right", fontsize="small")
    fig.suptitle(tag)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out, buf.getvalue())
    return out
