"""Experiment trackers (--log-with) through accelerate, which implements them; ptcli only says what to log.

One tracker run per tune, named after the project and its tags: the settings once, then every step's
loss, lr and tokens/s, and every validation's metrics (`val_acc/TAG` when several tags run together).
Runs are written under --log-dir: tensorboard's event files, wandb's run folder, and mlflow's SQLite
store (DIR/mlflow.db, unless MLFLOW_TRACKING_URI names another).
accelerate logs on the main process only. No torch or accelerate import at module level: the CLI checks
the trackers' packages before it relaunches or loads anything.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptcli.config import RUN_SETTINGS, TaskConfig, computed_settings
from ptcli.errors import UsageError
from ptcli.project.manifest import ProjectDir

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ptcli.tuning.recipe import Reporter

# The modules accelerate looks for (accelerate.utils.is_*_available); a tracker not named here needs its own name.
MODULES = {"tensorboard": ("tensorboard", "tensorboardX")}
EXTRAS = {name: f"pip install 'ptcli[{name}]'" for name in ("tensorboard", "wandb", "mlflow")}


def require(cfgs: dict[str, TaskConfig]) -> None:
    """Refuse trackers whose package is missing, naming what to install, before any work starts."""
    for name in _names(cfgs):
        if not any(find_spec(m) for m in MODULES.get(name, (name,))):
            install = EXTRAS.get(name, f"pip install {name.replace('_', '-')}")
            raise UsageError(f"--log-with {name} needs the {name!r} package, which is not installed", hint=install)


def accelerator_options(project: ProjectDir, cfgs: dict[str, TaskConfig]) -> dict[str, Any]:
    """Accelerator(...)'s tracker arguments: none when the run logs nowhere."""
    names, log_dir = _names(cfgs), next(iter(cfgs.values())).log_dir  # shared: config.RUN_SETTINGS
    if not names:
        return {}
    return {"log_with": names, "project_dir": log_dir or str(project.root / "runs" / "trackers")}


def watched(reporter: Reporter, acc: Accelerator, project: ProjectDir, cfgs: dict[str, TaskConfig]) -> Reporter:
    """Start the run's trackers and return a reporter that also logs to them (`reporter` itself if none)."""
    names = _names(cfgs)
    if not names:
        return reporter
    name = f"{project.root.name}-{'+'.join(cfgs)}"
    log_dir = Path(accelerator_options(project, cfgs)["project_dir"]).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    if "mlflow" in names:  # accelerate takes mlflow's store from the environment: by default, one under the log dir
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{log_dir / 'mlflow.db'}")
    runs = {"wandb": {"name": name, "dir": str(log_dir)}, "mlflow": {"run_name": name}}  # the others: name = run
    acc.init_trackers(name, config=settings_of(project, cfgs), init_kwargs={n: runs[n] for n in names if n in runs})
    return Tracked(reporter, acc, multi=len(cfgs) > 1)


def finish(acc: Accelerator) -> None:
    """Flush and close the trackers (not `acc.end_training`, which also ends the process group)."""
    for tracker in acc.trackers:
        tracker.finish()


def settings_of(project: ProjectDir, cfgs: dict[str, TaskConfig]) -> dict[str, Any]:
    """The run's settings as trackers take them: flat, no None; a tag's own settings as `name/TAG` if several."""
    values: dict[str, Any] = {
        "project": str(project.root),
        "tags": "+".join(cfgs),
        "base": project.base.ref,
        "num_prompt_tokens": project.num_prompt_tokens,
    }
    for tag, cfg in cfgs.items():
        for key, value in computed_settings(cfg).items():
            values[key if key in RUN_SETTINGS or len(cfgs) == 1 else f"{key}/{tag}"] = value
    return {k: v for k, v in values.items() if v is not None}


def _names(cfgs: dict[str, TaskConfig]) -> list[str]:
    return next(iter(cfgs.values())).trackers()


@dataclass
class Tracked:
    """A Reporter that passes everything on to `inner` and logs steps and validations to the trackers."""

    inner: Reporter
    acc: Accelerator
    multi: bool  # several tags: each validation metric is named `metric/TAG`
    last: float = field(default_factory=time.perf_counter)  # when the last step (or validation) ended

    def status(self, message: str) -> None:
        self.inner.status(message)

    def start(self, total: int, done: int) -> None:
        self.inner.start(total, done)
        self.last = time.perf_counter()

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.inner.step(step, loss, lr, tokens)
        now = time.perf_counter()
        seconds, self.last = max(now - self.last, 1e-9), now
        self.acc.log({"loss": loss, "lr": lr, "tokens_per_s": tokens / seconds}, step=step)

    def evaluated(self, step: int, metrics: dict[str, float], tag: str | None = None) -> None:
        self.inner.evaluated(step, metrics, tag)
        suffix = f"/{tag}" if self.multi and tag else ""
        self.acc.log({f"{k}{suffix}": v for k, v in metrics.items()}, step=step)
        self.last = time.perf_counter()  # a validation's time is no step's
