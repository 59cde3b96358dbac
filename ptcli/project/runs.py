"""A project's run directories, read and written without torch.

    runs/TAG/checkpoint.safetensors   an interrupted run's state (a sealed file; see tuning/checkpoint.py)
    runs/TAG/metrics.jsonl            a finished run's steps and this tag's validations (StepRow, EvalRow)
    runs/history.jsonl                one line per finished run, appended

Tags tuned together share `runs/A+B/` ('+' is never part of a tag). `ptcli check` and a resumed
`tune` verify a checkpoint here (structure and sha256) before anything loads its tensors.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptcli.errors import ProjectError, write_failure
from ptcli.project import sealed
from ptcli.project.manifest import ProjectDir
from ptcli.project.storage import atomic_write


def checkpoint_path(project: ProjectDir, tags: list[str] | str) -> Path:
    """runs/TAG/, or runs/A+B/ for tags tuned together ('+' is never part of a tag)."""
    return project.run_dir(tags if isinstance(tags, str) else "+".join(tags)) / "checkpoint.safetensors"


def verify_checkpoint(source: Path) -> dict[str, Any]:
    """The record of a whole, intact checkpoint (structure and sha256 checked, no torch).

    A damaged one raises ProjectError naming it.
    """
    hint = "delete it and tune again, or retune with --overwrite"
    try:
        header, record, data = sealed.split(source.read_bytes(), "checkpoint")
        if not isinstance(record.get("config"), dict):
            raise sealed.Unreadable("its record is not a ptcli checkpoint's")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (sealed.Unreadable, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ProjectError(f"checkpoint {source} is unreadable ({e})", hint=hint) from e
    legacy = "sha256" not in record  # written before checkpoints carried a checksum: structure checks only
    if max(ends, default=0) != len(data) or not legacy and not sealed.checksum_ok(record["sha256"], data):
        raise ProjectError(f"checkpoint {source} is corrupted: its checksum does not match", hint=hint)
    return record


@dataclass(frozen=True)
class StepRow:
    """One optimizer step of a run (every tag of it together)."""

    step: int
    loss: float
    lr: float

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "lr": self.lr}


@dataclass(frozen=True)
class EvalRow:
    """One tag's validation at a step: val_loss, val_acc and, with an answer set, val_acc_rank."""

    step: int
    tag: str
    metrics: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "tag": self.tag, **self.metrics}


HistoryRow = StepRow | EvalRow


def row_from_json(row: dict[str, Any]) -> HistoryRow:
    """A history row as a checkpoint stores it: a validation names its tag, a step does not."""
    if "tag" in row:
        return EvalRow(row["step"], row["tag"], {k: v for k, v in row.items() if k not in ("step", "tag")})
    return StepRow(row["step"], row["loss"], row["lr"])


def belongs_to(row: HistoryRow, tag: str) -> bool:
    """A tag's history: every step of its run, its own validations."""
    return not isinstance(row, EvalRow) or row.tag == tag


def log_path(project: ProjectDir, tag: str) -> Path:
    return project.run_dir(tag) / "metrics.jsonl"


def write_log(project: ProjectDir, tag: str, history: list[HistoryRow]) -> Path:
    """One tag's metrics, one JSON object per line: the run's training steps and this tag's validations."""
    target = log_path(project, tag)
    mine = [{k: v for k, v in h.to_json().items() if k != "tag"} for h in history if belongs_to(h, tag)]
    atomic_write(target, "".join(json.dumps(h) + "\n" for h in mine).encode())
    return target


def append_runs(project: ProjectDir, records: list[dict[str, Any]]) -> Path:
    """One line per finished tag's run in `runs/history.jsonl`, appended in one write.

    A write the disk cuts short is taken back (truncating needs no space), so the history never holds a
    partial line; the failure raises WriteError naming the file.
    """
    target = project.root / "runs" / "history.jsonl"
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as e:
        raise write_failure(target, e) from e
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a short write: the disk filled mid-line
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, size)
            raise write_failure(target, e) from e
    finally:
        os.close(fd)
    return target
