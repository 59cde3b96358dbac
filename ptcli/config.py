"""Typed settings for tuning and inference. Each field names the CLI flag that sets it,
so a bad value raises an error the user can act on. No torch import here: light commands use it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptcli.choices import Init, Reparam
from ptcli.errors import UsageError

INIT_METHODS = Init.values()
REPARAMS = Reparam.values()
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def _flag(flag: str, help: str) -> dict[str, str]:
    return {"flag": flag, "help": help}


@dataclass
class TaskConfig:
    """How one tag's prompt is tuned. Recorded in the project by `add-task` (or `tune`)."""

    train: str = field(default="", metadata=_flag("--train", "Training set, jsonl ({prompt_tag, text, answer})."))
    valid: str = field(default="", metadata=_flag("--valid", "Validation set, jsonl."))
    init: str = field(
        default="text",
        metadata=_flag(
            "--init",
            "Prompt init: text, labels (class-label embeddings, then sampled vocabulary), vocab (sampled vocabulary), or random.",
        ),
    )
    init_text: str | None = field(
        default=None,
        metadata=_flag(
            "--init-text", "Init text: tokenized, tiled or clipped to the prompt length. Default: the task's answers."
        ),
    )
    answer_only: bool = field(
        default=True, metadata=_flag("--answer-only", "Loss on the answer only (else on text and answer).")
    )
    batch_size: int = field(default=16, metadata=_flag("--batch-size", "Global batch size."))
    lr: float = field(
        default=0.1, metadata=_flag("--lr", "Peak learning rate.")
    )  # best of 0.03 / 0.1 / 0.3 on SST-2 val (bench/sweep.py)
    min_lr: float = field(
        default=3e-4, metadata=_flag("--min-lr", "Learning rate reached at --max-steps (cosine decay).")
    )
    warmup_steps: int = field(default=10, metadata=_flag("--warmup-steps", "Linear warmup steps from 0 to --lr."))
    constant_steps: int = field(
        default=0, metadata=_flag("--constant-steps", "Steps held at --lr after warmup, before decay.")
    )
    max_steps: int = field(
        default=200, metadata=_flag("--max-steps", "Optimizer steps in total (0 stores the initial prompt).")
    )
    val_check_interval: int = field(
        default=50, metadata=_flag("--val-check-interval", "Validate (and checkpoint) every N steps.")
    )
    max_seq_length: int = field(
        default=512, metadata=_flag("--max-seq-length", "Max tokens per example, soft prompt included.")
    )
    seed: int = field(default=1234, metadata=_flag("--seed", "Random seed (init and data order)."))
    group_by_length: bool = field(
        default=True,
        metadata=_flag(
            "--group-by-length",
            "Batch rows of similar length together (less padding); the batches still come in random order.",
        ),
    )
    ensemble: int = field(
        default=1,
        metadata=_flag("--ensemble", "Prompts trained for the tag (own data order each); infer combines them."),
    )
    template: str = field(
        default="prefix",
        metadata=_flag(
            "--template",
            "Where the prompt sits: prefix, suffix, or a template such as '{text}{prompt}{answer}' or "
            "'{prompt:10}{text} Answer:{prompt}{answer}' (slots add up to the prompt length).",
        ),
    )
    reparam: str = field(
        default="none",
        metadata=_flag(
            "--reparam",
            "Train the prompt through an encoder, dropped after training: none, residual (P + MLP(P)), mlp or lstm (P-tuning).",
        ),
    )
    reparam_lr: float = field(
        default=1e-3, metadata=_flag("--reparam-lr", "Peak learning rate of the --reparam encoder's weights.")
    )
    max_minutes: float | None = field(
        default=None,
        metadata=_flag(
            "--max-minutes", "Stop training after this much wall time; the decay then runs over the time budget."
        ),
    )

    def __post_init__(self) -> None:
        problems = []
        if self.init not in INIT_METHODS:
            problems.append(f"--init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")
        if self.init == "text" and self.init_text is not None and not self.init_text.strip():
            problems.append("--init-text must not be empty")
        if self.max_minutes is not None and not self.max_minutes > 0:
            problems.append(f"--max-minutes must be positive, got {self.max_minutes}")
        for name in ("batch_size", "max_seq_length", "val_check_interval", "ensemble"):
            if getattr(self, name) < 1:
                problems.append(f"{flag_of(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "constant_steps", "max_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{flag_of(name)} must be 0 or more, got {getattr(self, name)}")
        if self.reparam not in REPARAMS:
            problems.append(f"--reparam must be one of {', '.join(REPARAMS)}, got {self.reparam!r}")
        if not self.reparam_lr > 0:
            problems.append(f"--reparam-lr must be positive, got {self.reparam_lr}")
        if not self.lr > 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            problems.append(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if problems:
            raise UsageError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown task settings: {', '.join(unknown)}")
        return cls(**data)


# What shapes the steps of a run: tags tuned together in one run must agree on these.
RUN_SETTINGS = (
    "batch_size",
    "lr",
    "min_lr",
    "warmup_steps",
    "constant_steps",
    "max_steps",
    "val_check_interval",
    "max_seq_length",
    "seed",
    "group_by_length",
    "ensemble",
    "max_minutes",
    "template",
    "reparam",
    "reparam_lr",
)


def check_run_together(cfgs: dict[str, TaskConfig]) -> None:
    """Several tags share one run's batches and schedule; their recorded settings must not pull apart."""
    first = next(iter(cfgs.values()))
    differ = [n for n in RUN_SETTINGS if any(getattr(c, n) != getattr(first, n) for c in cfgs.values())]
    if differ:
        values = "; ".join(
            f"{flag_of(n)}: " + ", ".join(f"{t}={getattr(c, n)}" for t, c in cfgs.items()) for n in differ
        )
        raise UsageError(
            f"tags tuned together must share their run settings ({values})", hint="pass those flags to set them for all"
        )


def flag_of(name: str) -> str:
    """The CLI flag that sets a TaskConfig field."""
    return next(f.metadata["flag"] for f in dataclasses.fields(TaskConfig) if f.name == name)


def merge_task(recorded: dict[str, Any] | None, given: dict[str, Any]) -> TaskConfig:
    """Flags given on the command line override what `add-task` recorded; None means not given."""
    merged = dict(recorded or {})
    merged.update({k: v for k, v in given.items() if v is not None})
    for name in ("train", "valid"):  # recorded paths must still work from another directory
        value = given.get(name)
        if value and value != "-" and not value.startswith(("/dev/", "/proc/")):  # keep `<(cmd)` pipes as typed
            merged[name] = str(Path(value).expanduser().resolve())
    for name in ("train", "valid"):
        if not merged.get(name):
            raise UsageError(
                f"{flag_of(name)} is required (no recorded task gives it)", hint="pass it, or run `ptcli add-task`"
            )
    return TaskConfig.from_dict(merged)


def check_tag(tag: str) -> str:
    if not TAG_PATTERN.fullmatch(tag):
        raise UsageError(
            f"--tag {tag!r} is not a valid tag: use letters, digits, '_', '.', '-' (up to 64, starting with a letter or digit)"
        )
    return tag


def check_prompt_length(n: int) -> int:
    if not 1 <= n <= 4096:
        raise UsageError(f"--num-prompt-tokens must be between 1 and 4096, got {n}")
    return n
