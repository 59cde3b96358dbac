"""Batched, mixed-tag inference: group a file by tag, batch each tag by length, restore input order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ptcli import bank
from ptcli.data import read_jsonl
from ptcli.errors import CompatibilityError, ProjectError
from ptcli.model import fingerprint, greedy, load_base
from ptcli.project import Project


@dataclass
class InferResult:
    rows: list[dict[str, Any]]  # input rows in input order, each with `prediction` added
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # per tag, where rows carry answers


def infer(
    project: Project,
    path: str,
    *,
    tokens_to_generate: int = 32,
    batch_size: int = 16,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    status=lambda _: None,
) -> InferResult:
    records = read_jsonl(path, training=False)
    known = bank.tags(project)
    unknown = sorted({r.tag for r in records} - set(known))
    if unknown:
        raise ProjectError(
            f"unknown tag(s) {', '.join(map(repr, unknown))}; known tags: {', '.join(known) or 'none yet'}",
            hint="tune them first with `ptcli tune --tag ...`",
        )
    model, tok = load_base(project.base.ref, dtype, trust_remote_code, status, device_map=device_map)
    if fingerprint(model) != project.base.fingerprint:
        raise CompatibilityError(f"the base model at {project.base.ref!r} has changed since `ptcli init`")
    P = project.num_prompt_tokens
    texts = tok([r.text for r in records], add_special_tokens=False).input_ids
    predictions: list[str] = [""] * len(records)
    for tag in sorted({r.tag for r in records}):
        prompt, meta = bank.get(project, tag)
        budget = meta["config"]["max_seq_length"] - P - tokens_to_generate
        if budget < 1:
            raise ProjectError(f"--tokens-to-generate {tokens_to_generate} leaves no room for text in {tag!r}'s max sequence length")
        idx = sorted((i for i, r in enumerate(records) if r.tag == tag), key=lambda i: len(texts[i]))
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            with torch.inference_mode():
                outs = greedy(model, prompt, [texts[i][-budget:] for i in chunk], tok.pad_token_id, tok.eos_token_id, tokens_to_generate)
            for i, out in zip(chunk, outs):
                predictions[i] = tok.decode(out, skip_special_tokens=True).strip()
    rows = [{**r.row, "prediction": p} for r, p in zip(records, predictions)]
    return InferResult(rows, accuracy(records, predictions))


def accuracy(records, predictions: list[str]) -> dict[str, dict[str, float]]:
    """Exact match after stripping whitespace, per tag, over rows that carry an answer."""
    stats: dict[str, dict[str, float]] = {}
    for r, p in zip(records, predictions):
        if r.answer is None:
            continue
        s = stats.setdefault(r.tag, {"correct": 0, "total": 0})
        s["correct"] += p == r.answer.strip()
        s["total"] += 1
    for s in stats.values():
        s["accuracy"] = s["correct"] / s["total"]
    return stats
