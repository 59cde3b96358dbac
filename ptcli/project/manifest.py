"""The project directory: a manifest naming the base model and the prompt length, plus the bank.

Layout:
    DIR/ptcli.json               manifest (schema version, base model, prompt length, tasks)
    DIR/bank/TAG.safetensors     one tuned prompt per tag (see bank.py)
    DIR/runs/TAG/                checkpoints and metrics of tuning runs
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptcli.config import TaskConfig
from ptcli.errors import ProjectError
from ptcli.project.storage import atomic_write_json

MANIFEST = "ptcli.json"
SCHEMA_VERSION = 1


@dataclass
class BaseInfo:
    """What the project's prompts were made for. `ref` is 'default', a local folder or a hub id."""

    ref: str
    fingerprint: str
    hidden_size: int
    model_type: str


@dataclass
class ProjectDir:
    """A project directory as its manifest describes it; every module below api.py takes one of these.

    (The library's `api.Project` wraps it for scripts.)"""

    root: Path
    base: BaseInfo
    num_prompt_tokens: int
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str = ""

    @property
    def bank_dir(self) -> Path:
        return self.root / "bank"

    def run_dir(self, tag: str) -> Path:
        return self.root / "runs" / tag

    def task(self, tag: str) -> TaskConfig | None:
        return TaskConfig.from_dict(self.tasks[tag]) if tag in self.tasks else None

    def record_task(self, tag: str, cfg: TaskConfig) -> None:
        self.tasks[tag] = cfg.to_dict()
        self.save()

    def save(self) -> None:
        atomic_write_json(
            self.root / MANIFEST,
            {
                "schema_version": SCHEMA_VERSION,
                "base": vars(self.base),
                "num_prompt_tokens": self.num_prompt_tokens,
                "created": self.created,
                "tasks": self.tasks,
            },
        )


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def create(root: Path, base: BaseInfo, num_prompt_tokens: int) -> ProjectDir:
    root.mkdir(parents=True, exist_ok=True)
    project = ProjectDir(root=root, base=base, num_prompt_tokens=num_prompt_tokens, created=now())
    project.bank_dir.mkdir(exist_ok=True)
    project.save()
    return project


def find_root(start: Path | None = None) -> Path:
    """The project given by --project, or the nearest directory at or above the cwd holding a manifest."""
    if start is not None:
        if not (start / MANIFEST).is_file():
            raise ProjectError(f"no ptcli project at {start}", hint=f"run `ptcli init {start}` first")
        return start
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / MANIFEST).is_file():
            return d
    raise ProjectError(
        f"no ptcli project in {here} or any parent directory", hint="run `ptcli init DIR`, or pass --project DIR"
    )


def load(start: Path | None = None) -> ProjectDir:
    root = find_root(start)
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ProjectError(
                f"{path} has schema version {data.get('schema_version')!r}; this ptcli reads version {SCHEMA_VERSION}"
            )
        return ProjectDir(
            root=root,
            base=BaseInfo(**data["base"]),
            num_prompt_tokens=int(data["num_prompt_tokens"]),
            tasks=dict(data.get("tasks", {})),
            created=data.get("created", ""),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProjectError(f"cannot read manifest {path}: {e}") from e
