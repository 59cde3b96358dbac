"""What a bank prompt says about itself, as a typed record, and the rules that read it.

A prompt file's safetensors header holds this record as JSON. Every reader and writer goes
through `PromptRecord` so a key is spelled once. Old files stay readable: every field may
be missing (records from before a field existed, prompts imported from PEFT), and keys this
version does not know are kept in `extra`, so reading and writing a record loses nothing.
No torch here: `list-tags` and `show` read records without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ptcli.enums import Mode


def headline(metrics: dict[str, float]) -> str:
    """The metric a prompt is kept by: ranked accuracy where the task has an answer set, else exact match."""
    return "val_acc_rank" if "val_acc_rank" in metrics else "val_acc"


def kept_mode(choices: list[str] | None) -> Mode:
    """The mode validation kept a prompt by, and so infer's default: rank exactly when there is an answer set."""
    return Mode.RANK if choices else Mode.GENERATE


@dataclass
class PromptRecord:
    """A prompt's settings, metrics, base and checksum (the bank header's `ptcli` JSON)."""

    tag: str | None = None
    init: str | None = None  # an Init, or "peft" for an adapter made outside ptcli
    init_text: str | None = None
    choices: list[str] | None = None  # the closed answer set seen in training, if any
    mode: Mode | None = None  # None in records from before it was stored: see `answer_mode`
    ensemble: int = 1
    tuned_with: list[str] | None = None  # the other tags of the run
    config: dict[str, Any] = field(default_factory=dict)  # TaskConfig.to_dict()
    steps: int | None = None
    best_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    initial_metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float | None = None
    world_size: int | None = None
    inputs: dict[str, Any] | None = None  # checkpoint.inputs_of: what --auto-resume compares
    created: str | None = None
    updated: str | None = None
    imported_from: dict[str, Any] | None = None
    distilled: dict[str, Any] | None = (
        None  # `ptcli distill`'s teacher: its text's sha256 and length, and what it was asked
    )
    schema_version: int | None = None
    num_prompt_tokens: int | None = None
    depth: int = 1  # blocks the prompt gives vectors to: a deep prompt's tensor holds depth * num_prompt_tokens rows
    hidden_size: int | None = None
    base_ref: str | None = None
    base_fingerprint: str | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    @property
    def answer_mode(self) -> Mode:
        """The mode the prompt was chosen by; for older records and imports, the one validation would have used."""
        return self.mode or kept_mode(self.choices)

    @property
    def template(self) -> str:
        return self.config.get("template", "prefix")

    @property
    def prompt_layer(self) -> int:
        """The block the prompt enters before (0: the input, as in records from before late prompts)."""
        return int(self.config.get("prompt_layer", 0))

    def engine_problems(self, tag: str, target: str) -> list[str]:
        """Why `target` (what an engine takes for one request's prompt) cannot hold this prompt; none when it can.

        An engine reads one prompt at the input embeddings: not an ensemble's vote, not vectors entered higher up.
        """
        problems = []
        if self.ensemble > 1:
            problems.append(
                f"{tag!r} is an ensemble of {self.ensemble} prompts that answer by vote, and {target} holds one prompt"
            )
        if self.prompt_layer:
            problems.append(
                f"{tag!r} is a late prompt: it enters before block {self.prompt_layer}, and {target} enters at the "
                "input embeddings"
            )
        if self.depth > 1:
            problems.append(
                f"{tag!r} is a deep prompt (vectors for {self.depth} blocks, entered as hidden states), and {target} "
                "holds input embeddings only"
            )
        return problems

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PromptRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.extra = {k: v for k, v in data.items() if k not in known}
        if record.mode is not None:
            record.mode = Mode(record.mode) if record.mode in Mode.values() else None
        return record

    def to_json(self) -> dict[str, Any]:
        """The JSON object as stored; a field that is None is left out, as older records left it out."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v.value if isinstance(v, Enum) else v for k, v in out.items() if v is not None}
        if self.depth == 1:
            del out["depth"]  # a shallow prompt's record reads as before deep prompts
        return {**self.extra, **out}
