"""Batched, mixed-tag inference: group a file by tag, batch each tag by length, restore input order.

Two modes: `generate` decodes greedily; `rank` scores each candidate of the tag's closed
answer set (found in its training data, or given) and picks the likeliest, optionally after
contextual calibration. A tag's default mode is the one its validation kept the prompt by.
An ensemble's members run in the same batch and vote (generate) or average their scores (rank).

Under torchrun/accelerate (or `ptcli infer --devices N`) process r runs batches r, r+N, ...
of that same plan and every process gathers all predictions: the batches, and so the
answers, are the ones a single process computes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptcli import dist
from ptcli.config import BaseOptions
from ptcli.data.encode import answer_ids
from ptcli.data.jsonl import Record, check_inference_row, read_jsonl
from ptcli.data.template import Layout
from ptcli.enums import Mode
from ptcli.errors import InputError, ProjectError, UsageError, unknown_tags
from ptcli.lm.base import load_project_base
from ptcli.lm.forward import answer
from ptcli.project import bank
from ptcli.project.manifest import Project


@dataclass
class InferResult:
    rows: list[dict[str, Any]]  # input rows in input order, each with `prediction` added
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # per tag, where rows carry answers
    modes: dict[str, str] = field(default_factory=dict)  # per tag: generate or rank


def answers(
    model,
    tok,
    prompts: torch.Tensor,
    seqs: list[list[int]],
    *,
    max_new: int = 0,
    choices: list[str] | None = None,
    agree=None,
):
    """One batch behind one tag's prompts (K, P, H) or (P, H), every member in one pass.

    Returns (greedy answers, members voting; ties go to the first member) when max_new > 0,
    (ranked answers, members' scores averaged) when choices are given, and the members'
    scores (B, K, C).
    """
    prompts = prompts if prompts.dim() == 3 else prompts.unsqueeze(0)  # (K, P, H)
    K, B = prompts.shape[0], len(seqs)
    rows, which = [s for s in seqs for _ in range(K)], list(range(K)) * B  # (B*K), member-minor
    outs, scores = answer(
        model,
        prompts,
        rows,
        tok.pad_token_id,
        tok.eos_token_id,
        which=which,
        max_new=max_new,
        choices=answer_ids(tok, choices) if choices else None,
        agree=agree,
    )
    voted = ranked = None
    if outs is not None:
        texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
        voted = [Counter(texts[i * K : (i + 1) * K]).most_common(1)[0][0] for i in range(B)]
    if scores is not None and choices:
        scores = scores.view(B, K, -1)  # (B, K, C)
        ranked = [choices[j] for j in scores.mean(1).argmax(-1).tolist()]
    return voted, ranked, scores


def predict(
    model,
    tok,
    prompts: torch.Tensor,
    seqs: list[list[int]],
    mode: str,
    choices: list[str] | None = None,
    max_new: int = 32,
    bias: torch.Tensor | None = None,
) -> list[str]:
    """One batch of answers in one mode; see `answers`. `bias` (K, C) calibrates ranked scores (see `calibrate`)."""
    if mode == Mode.RANK:
        assert choices, "rank mode needs an answer set (tag_modes checks it)"
        scores = answers(model, tok, prompts, seqs, choices=choices)[2]  # (B, K, C)
        scores = scores if bias is None else scores - bias
        return [choices[j] for j in scores.mean(1).argmax(-1).tolist()]
    return answers(model, tok, prompts, seqs, max_new=max_new)[0]


CONTENT_FREE = ("N/A",)  # Zhao et al. (2021)'s content-free input, in place of the text


def calibration_bias(content_free: torch.Tensor) -> torch.Tensor:
    """Contextual calibration's bias: (N, ..., C) answer scores after N content-free inputs -> (..., C).

    The log of the answer-set distribution the content-free inputs give, averaged over them.
    Subtracting it from a row's log-likelihoods (`calibrate`) is Zhao et al.'s diagonal
    W = diag(p_cf)^-1 in log space: an answer the prompt favours whatever the text loses that edge.
    """
    return content_free.float().softmax(-1).mean(0).log()


def calibrate(scores: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Candidate log-likelihoods (B, ..., C) corrected by the content-free scores (N, ..., C)."""
    return scores - calibration_bias(content_free)


@torch.inference_mode()
def content_free_bias(model, tok, prompts: torch.Tensor, choices: list[str], layout: Layout) -> torch.Tensor:
    """`calibration_bias` of one tag's prompts (K, P, H) or (P, H) over its answer set: (K, C).

    The content-free rows are laid out as the tag's.
    """
    rows = [layout.context(ids) for ids in tok(list(CONTENT_FREE), add_special_tokens=False).input_ids]
    free = answers(model, tok, prompts, rows, choices=choices)[2]  # (N, K, C)
    return calibration_bias(free)


def records_of(source: str | Path | Iterable[dict[str, Any]]) -> list[Record]:
    """Rows from a jsonl file ('-': stdin), or rows given as dicts, held to the same rules.

    A given row's `line` is its position from 1, so a problem reads `row 3: missing field 'text'`.
    """
    if isinstance(source, (str, Path)):
        return read_jsonl(str(source), training=False)
    rows = list(source)
    problems = [f"row {i}: {p}" for i, row in enumerate(rows, 1) for p in check_inference_row(row)]
    if problems or not rows:
        raise InputError(f"the rows have {len(problems)} problem(s)" if rows else "no rows given", problems[:20])
    return [Record(i, r["prompt_tag"], r["text"], r.get("answer"), r) for i, r in enumerate(rows, 1)]


@dataclass
class TagPlan:
    """How one tag's rows are answered: its prompts, mode, answer set, layout, text budget and calibration."""

    prompt: torch.Tensor  # (P, H), or (K, P, H) for an ensemble
    mode: Mode
    options: list[str] | None
    layout: Layout
    budget: int  # text tokens that fit beside the prompt, the template and the answer
    bias: torch.Tensor | None  # (K, C) contextual calibration, ranked tags only

    @classmethod
    def of(cls, project, model, tok, tag: str, mode: Mode, choices, tokens_to_generate: int, calibrated: bool):
        prompt, record = bank.get(project, tag)
        options = choices or record.choices
        assert options or mode == Mode.GENERATE, "rank mode needs an answer set (tag_modes checks it)"
        room = tokens_to_generate if mode == Mode.GENERATE else max(map(len, answer_ids(tok, options or [])))
        layout = Layout(tok, record.template, project.num_prompt_tokens)
        budget = record.config["max_seq_length"] - layout.overhead() - room
        if budget < 1:
            raise ProjectError(f"the answers ({room} tokens) leave no room for text in {tag!r}'s max sequence length")
        bias = (
            content_free_bias(model, tok, prompt, options or [], layout) if calibrated and mode == Mode.RANK else None
        )
        return cls(prompt, mode, options, layout, budget, bias)

    @torch.inference_mode()
    def answer(self, model, tok, texts: list[list[int]], tokens_to_generate: int) -> list[str]:
        seqs = [self.layout.context(t[-self.budget :]) for t in texts]  # texts cut from the left to fit
        return predict(model, tok, self.prompt, seqs, self.mode, self.options, tokens_to_generate, self.bias)


def infer(
    project: Project,
    source: str | Path | Iterable[dict[str, Any]],
    *,
    mode: str | None = None,
    choices: list[str] | None = None,
    calibrated: bool = False,
    tokens_to_generate: int = 32,
    batch_size: int = 16,
    base: BaseOptions = BaseOptions(),
    status: Callable[[str], None] = lambda _: None,
) -> InferResult:
    """Answers for every row of `source` (a jsonl path, '-', or dicts); each tag in `mode`, or by default in the
    mode its prompt was chosen by (`PromptRecord.answer_mode`). Batches go by tag, then by length; rows come back
    in input order."""
    if mode is not None and mode not in Mode.values():
        raise UsageError(f"--mode must be one of {', '.join(Mode.values())}, got {mode!r}")
    records = records_of(source)
    modes = tag_modes(project, sorted({r.tag for r in records}), mode, choices)
    if calibrated and Mode.RANK not in modes.values():
        raise UsageError("--calibrate corrects ranked answers, and no tag here is ranked", hint="add --mode rank")
    rank, world, device = dist.join_group()
    model, tok = load_project_base(project.base, base, status)
    if base.device_map is None:
        model.to(device)
    texts = tok([r.text for r in records], add_special_tokens=False).input_ids
    predictions: dict[int, str] = {}  # row index -> answer, for the rows of this process's batches
    batch = -1
    for tag, how in modes.items():
        plan = TagPlan.of(project, model, tok, tag, how, choices, tokens_to_generate, calibrated)
        idx = sorted((i for i, r in enumerate(records) if r.tag == tag), key=lambda i: len(texts[i]))
        for start in range(0, len(idx), batch_size):
            chunk, batch = idx[start : start + batch_size], batch + 1
            if batch % world == rank:  # process r answers batches r, r+N, ...: the plan one process would run
                predictions.update(zip(chunk, plan.answer(model, tok, [texts[i] for i in chunk], tokens_to_generate)))
    if world > 1:
        predictions = {i: p for part in dist.gather_objects(predictions) for i, p in part.items()}
    ordered = [predictions[i] for i in range(len(records))]
    rows = [{**r.row, "prediction": p} for r, p in zip(records, ordered)]
    return InferResult(rows, accuracy(records, ordered), {t: str(m) for t, m in modes.items()})


def tag_modes(project: Project, tags: list[str], mode: str | None, choices: list[str] | None) -> dict[str, Mode]:
    """Each tag's mode: `mode` if given, else the one its prompt was chosen by; rank needs an answer set."""
    known = bank.tags(project)
    unknown = [t for t in tags if t not in known]
    if unknown:
        raise unknown_tags(unknown, known)
    records = {t: bank.read_meta(project, t).record for t in tags}
    modes = {t: Mode(mode) if mode else records[t].answer_mode for t in tags}
    missing = [t for t in tags if modes[t] == Mode.RANK and not choices and not records[t].choices]
    if missing:
        raise UsageError(
            f"--mode rank needs an answer set: {', '.join(map(repr, missing))} had none in training",
            hint="pass --choices 'a,b,...', or use --mode generate",
        )
    return modes


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
