"""The tags of a run: each tag's rows per split, read once, and each tag encoded as the run trains it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ptcli.config import TaskConfig
from ptcli.data.encode import Encoded, answer_tokens, closed_answers, encode
from ptcli.data.jsonl import Record, read_jsonl
from ptcli.enums import Loss
from ptcli.errors import InputError, UsageError


@dataclass
class Splits:
    """Each tag's rows of the run, per split: what the run reads, and what --auto-resume compares."""

    train: dict[str, list[Record]]
    valid: dict[str, list[Record]]

    @classmethod
    def read(cls, cfgs: dict[str, TaskConfig]) -> Splits:
        return cls(read_split(cfgs, "train"), read_split(cfgs, "valid"))


@dataclass
class Task:
    """One tag of the run: its data, answer set and slots in the prompt stack."""

    tag: str
    cfg: TaskConfig
    train: Encoded
    valid: Encoded
    choices: list[str] | None
    init_text: str
    slots: list[int]
    candidates: list[list[int]] | None = None  # the answer set as training targets (answer_tokens), when closed


def read_split(cfgs: dict[str, TaskConfig], split: str) -> dict[str, list[Record]]:
    """Each tag's rows of one split; a file shared by several tags is read once (it may be stdin)."""
    by_path: dict[str, list[str]] = {}
    for tag, cfg in cfgs.items():
        by_path.setdefault(getattr(cfg, split), []).append(tag)
    out = {}
    for path, tags in by_path.items():
        rows = read_jsonl(path, training=True, tag=tags[0] if len(tags) == 1 else tuple(tags))
        for tag in tags:
            out[tag] = [r for r in rows if r.tag == tag]
            if not out[tag]:
                raise InputError(f"{path} has no rows for tag {tag!r}", [])
    return out


def make_tasks(tok: Any, cfgs: dict[str, TaskConfig], rows: Splits, P: int) -> list[Task]:
    """Each tag's encoded rows, answer set, init text and slots (tag n, member k: slot n*K + k)."""
    tasks = []
    for n, (tag, cfg) in enumerate(cfgs.items()):
        train, valid, K = rows.train[tag], rows.valid[tag], cfg.ensemble
        choices = closed_answers(train)
        if cfg.loss == Loss.CHOICES and choices is None:
            raise UsageError(
                f"--loss choices needs a closed answer set, and {tag!r}'s training answers are too varied",
                hint="use --loss answer (the answer's LM loss)",
            )
        tasks.append(
            Task(
                tag,
                cfg,
                encode(tok, train, P, cfg.max_seq_length, cfg.answer_only, source=cfg.train, template=cfg.template),
                encode(tok, valid, P, cfg.max_seq_length, cfg.answer_only, source=cfg.valid, template=cfg.template),
                choices,
                cfg.init_text or " ".join(sorted({r.answer for r in train if r.answer})[:100]),
                list(range(n * K, (n + 1) * K)),
                answer_tokens(tok, choices) if choices else None,
            )
        )
    return tasks
