"""`ptcli infer` and `Project.infer`: rows of a file (or given as dicts), answered in mixed-tag batches.

Two modes: `generate` decodes greedily; `rank` scores each candidate of the tag's closed
answer set (found in its training data, or given) and picks the likeliest, optionally after
contextual calibration. A tag's default mode is the one its validation kept the prompt by.
An ensemble's members run in the same batch and vote (generate) or average their scores (rank).

The rows of all tags are planned together, as the server batches them: rows that share a
pass of the engine (mode, generation length, prompt placement; for ranked rows, the answer
set) are sorted by length and cut into batches, whatever their tag, so a mixed file is one
pass over the data. Under torchrun/accelerate (or `ptcli infer --devices N`) process r runs
batches r, r+N, ... of that same plan and every process gathers all predictions: the
batches, and so the answers, are the ones a single process computes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptcli import dist
from ptcli.config import BaseOptions
from ptcli.data.jsonl import Record, check_inference_row, read_jsonl
from ptcli.enums import Backend, Mode
from ptcli.errors import InputError, UsageError, unknown_tags
from ptcli.inference.engine import Engine, Item, Prompt
from ptcli.project import bank
from ptcli.project.manifest import ProjectDir


@dataclass
class InferResult:
    rows: list[dict[str, Any]]  # input rows in input order, each with `prediction` added
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # per tag, where rows carry answers
    modes: dict[str, str] = field(default_factory=dict)  # per tag: generate or rank


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


def infer(
    project: ProjectDir,
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
    mode its prompt was chosen by (`PromptRecord.answer_mode`). Rows come back in input order."""
    if mode is not None and mode not in Mode.values():
        raise UsageError(f"--mode must be one of {', '.join(Mode.values())}, got {mode!r}")
    if base.engine == Backend.LLAMACPP:  # refused before the rows are read, as a bad flag is
        from ptcli.inference.llama_context import check_engine

        check_engine(project, base, int(os.environ.get("WORLD_SIZE", 1)))
    records = records_of(source)
    modes = tag_modes(project, sorted({r.tag for r in records}), mode, choices)
    if calibrated and Mode.RANK not in modes.values():
        raise UsageError("--calibrate corrects ranked answers, and no tag here is ranked", hint="add --mode rank")
    llama = base.engine == Backend.LLAMACPP  # one process, numpy prompts: nothing here imports torch
    rank, world, device = (0, 1, "cpu") if llama else dist.join_group()
    engine = open_engine(project, base, world, device, status)
    tok = engine.tok
    prompts = {t: Prompt.of(t, *bank.get(project, t, numpy=llama)) for t in modes}
    items = [
        Item(
            prompts[r.tag],
            r.text,
            modes[r.tag],
            tokens_to_generate,
            tuple(choices or prompts[r.tag].record.choices or ()),
            calibrated and modes[r.tag] == Mode.RANK,
        )
        for r in records
    ]
    laid = engine.laid_out(items, tok([r.text for r in records], add_special_tokens=False).input_ids)
    predictions: dict[int, str] = {}  # row index -> answer, for the rows of this process's batches
    for b, idx in enumerate(plan(engine, items, laid, batch_size)):
        if b % world == rank:  # process r answers batches r, r+N, ...: the plan one process would run
            answers = engine.run([items[i] for i in idx], [laid[i] for i in idx])
            predictions.update((i, a.text) for i, a in zip(idx, answers))
    if world > 1:
        predictions = {i: p for part in dist.gather_objects(predictions) for i, p in part.items()}
    ordered = [predictions[i] for i in range(len(records))]
    rows = [{**r.row, "prediction": p} for r, p in zip(records, ordered)]
    return InferResult(rows, accuracy(records, ordered), {t: str(m) for t, m in modes.items()})


def open_engine(project: ProjectDir, base: BaseOptions, world: int, device, status: Callable[[str], None]) -> Engine:
    """The engine that answers: ptcli's torch forward on the project's base, or llama.cpp on its GGUF file."""
    if base.engine == Backend.LLAMACPP:
        from ptcli.inference.llamacpp import load_engine

        return load_engine(project, base, status, world)
    from ptcli.lm.base import load_project_base

    model, tok = load_project_base(project.base, base, status)
    if base.device_map is None:
        model.to(device)
    return Engine(model, tok)


def plan(engine: Engine, items: list[Item], seqs: list[list[int]], batch_size: int) -> list[list[int]]:
    """Batches of row indices: rows of one pass of the engine, of any tags, sorted by length (less padding).

    Ranked rows also share their answer set: the engine scores the union of a batch's sets for every row,
    so tags with other sets in one batch would cost each row their candidates too (a server's batch
    cannot wait to be sorted; a file can).
    """
    passes: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        passes.setdefault((*engine.pass_key(it), it.choices if it.mode == Mode.RANK else ()), []).append(i)
    batches = []
    for idx in passes.values():
        idx = sorted(idx, key=lambda i: len(seqs[i]))
        batches += [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    return batches


def tag_modes(project: ProjectDir, tags: list[str], mode: str | None, choices: list[str] | None) -> dict[str, Mode]:
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
