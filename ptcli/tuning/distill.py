"""`ptcli distill`: a long instruction or few-shot text turned into the tag's few soft vectors, no labels needed.

Context distillation (Askell et al. 2021; Snell et al. 2022): the teacher is the frozen base with
the text where the tag's template puts the prompt (teacher.py); the student is the tag's soft
prompt, started from that text (tiled or clipped to the project's length). The teacher answers
every input once; the student is trained on the KL divergence to the teacher's next-token
distributions along those answers (`Imitation`), inside tune's own recipe: schedule, time budget,
resume, data parallel, the best validation step kept. Validation is agreement with the teacher on
held-out inputs: `val_acc` is the share of greedy answers equal to the teacher's, `val_loss` the
mean KL per answer position. The result is an ordinary bank entry whose record says it was
distilled, from which text (its sha256, never the text) and how many tokens a row saves.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ptcli.config import BaseOptions, TaskConfig
from ptcli.data.encode import Encoded
from ptcli.data.jsonl import read_jsonl
from ptcli.data.template import Layout
from ptcli.errors import InputError, UsageError
from ptcli.lm.answers import run_rows
from ptcli.lm.base import load_project_base
from ptcli.lm.batch import IGNORE
from ptcli.lm.rules import vote
from ptcli.project.manifest import ProjectDir
from ptcli.project.record import PromptRecord
from ptcli.project.runs import checkpoint_path
from ptcli.tuning import checkpoint, trackers
from ptcli.tuning.objective import Running
from ptcli.tuning.recipe import Reporter, setup
from ptcli.tuning.task import Splits, Task
from ptcli.tuning.teacher import Said, ask, kl, said_logprobs, teacher_ids, teacher_prompt
from ptcli.tuning.tune import TuneResult, check_start, finished, write_results
from ptcli.tuning.validate import agreed, batches_of, better

HELD_OUT = 200  # rows held out for validation when no --valid is given: a tenth of the inputs, at most this


@dataclass(frozen=True)
class Teaching:
    """What distill asks of the teacher: its text, how long an answer, how much of each distribution is kept."""

    text: str  # --from-text, or the contents of --from-file
    max_new_tokens: int = 16  # --max-new-tokens
    top_k: int = 64  # --top-k (0: the whole vocabulary)
    temperature: float = 0.0  # --temperature: sample the teacher's training answers (0: greedy)

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise UsageError("the teacher text is empty", hint="pass --from-text TEXT or --from-file FILE")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be 0 (the whole vocabulary) or more, got {self.top_k}")
        if not self.temperature >= 0:
            raise UsageError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def inputs(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one besides data and settings."""
        asked = {"teacher sha256": self.sha256, "max new tokens": self.max_new_tokens, "top k": self.top_k}
        return asked | ({"temperature": self.temperature} if self.temperature else {})  # greedy runs: as before


def read_inputs(cfg: TaskConfig, tag: str) -> Splits:
    """The tag's inputs, and its validation rows: --valid's, or when it is the inputs file, the last tenth held out."""
    rows = _tag_rows(cfg.train, tag)
    if cfg.valid != cfg.train:
        return Splits({tag: rows}, {tag: _tag_rows(cfg.valid, tag)})
    if len(rows) < 2:
        raise InputError(f"{cfg.train} has one row: distill holds some out for validation", hint="give --valid FILE")
    held = min(HELD_OUT, max(1, len(rows) // 10))
    return Splits({tag: rows[:-held]}, {tag: rows[-held:]})


def _tag_rows(path: str, tag: str):
    """A file's rows (prompt_tag and text; an answer is ignored), every one for `tag`, or the lines that are not."""
    rows = read_jsonl(path, training=False)
    other = [
        f"{path}:{r.line}: prompt_tag {r.tag!r} is not the tag being distilled ({tag!r})" for r in rows if r.tag != tag
    ]
    if other:
        raise InputError(
            f"{path} has rows of other tags", other[:20] + [f"... and {len(other) - 20} more"] * (len(other) > 20)
        )
    return rows


class Imitation:
    """The recipe's objective for distill: KL to the teacher's distributions; prompts kept by agreement with it."""

    def __init__(self, said: dict[str, tuple[list[Said], list[Said]]], max_new: int):
        self.said, self.max_new = said, max_new  # tag -> (train rows', valid rows') teacher answers

    def _kl(self, model, pad_id: int, prompts, enc: Encoded, said: list[Said], rows: list[int], which) -> torch.Tensor:
        """KL per answer position (N,) of `rows` of `enc`, each behind prompts[which[j]]."""
        logp = said_logprobs(
            model, prompts, [enc.prompts[i] for i in rows], [said[i].targets for i in rows], pad_id, which
        )
        ids = None if said[rows[0]].ids is None else torch.cat([said[i].ids for i in rows]).to(logp.device)  # type: ignore[misc]
        top = torch.cat([said[i].logp for i in rows]).to(logp.device)
        rest = torch.cat([said[i].rest for i in rows]).to(logp.device)
        return kl(logp, ids, top, rest)

    def loss(self, recipe: Running, picks: list[tuple[Task, int, int]]) -> tuple[torch.Tensor, int, int]:
        t = picks[0][0]  # distill trains one tag
        per = self._kl(
            recipe.model,
            recipe.tok.pad_token_id,
            recipe.prompt(),
            t.train,
            self.said[t.tag][0],
            [i for _, i, _ in picks],
            [t.slots[k] for _, _, k in picks],
        )
        P = recipe.prompt.weight.shape[-2]
        positions = sum(len(row) + P * (min(row) >= 0) for row in (t.train.ids[i] for _, i, _ in picks))  # slots held
        return per.sum(), int(per.numel()), positions

    def evaluate(self, recipe: Running, prompts: torch.Tensor, task: Task) -> dict[str, float]:
        """Agreement of the greedy answers with the teacher's (members vote), and the mean KL per position."""
        model, tok, acc, enc = recipe.model, recipe.tok, recipe.acc, task.valid
        said, K = self.said[task.tag][1], prompts.shape[0]
        agree = (lambda flag: agreed(acc, flag, "min")) if acc.num_processes > 1 else None
        same, kl_sum, count = 0, 0.0, 0
        with torch.no_grad():
            for idx in batches_of(enc, recipe.run.batch_size, acc):
                rows = idx or [0]  # an empty batch runs one row and counts nothing (a sharded base's calls match)
                out = run_rows(
                    model,
                    tok,
                    [prompts],
                    [enc.prompts[i] for i in rows],
                    [0] * len(rows),
                    max_new=self.max_new,
                    agree=agree,
                )
                per = self._kl(
                    model,
                    tok.pad_token_id,
                    prompts,
                    enc,
                    said,
                    [i for i in rows for _ in range(K)],
                    list(range(K)) * len(rows),
                )
                if idx:
                    assert out.texts is not None  # max_new >= 1
                    same += sum(texts[vote(texts)] == said[i].text for texts, i in zip(out.texts, idx))
                    kl_sum, count = kl_sum + float(per.sum()), count + per.numel()
        totals = acc.reduce(torch.tensor([kl_sum, count, same], dtype=torch.float64, device=acc.device), "sum")
        kl_sum, count, same = totals.tolist()
        return {"val_loss": kl_sum / max(count, 1), "val_acc": same / len(enc.ids)}

    def better(self, new: dict[str, float], best: dict[str, float] | None) -> bool:
        """More answers agree; equal agreement goes to the lower KL (tune's rule over val_acc and val_loss)."""
        return better(new, best)


def teach(
    model, tok, tag: str, cfg: TaskConfig, rows: Splits, teaching: Teaching, P: int, status
) -> tuple[Task, Imitation]:
    """The tag's rows laid out for the student, with the teacher's answers and distributions along them."""
    if cfg.prompt_layer or cfg.deep:
        raise UsageError(
            f"{tag!r} is recorded with a late or deep prompt (--prompt-layer {cfg.prompt_layer}), and distill trains "
            "a prompt at the input, where the teacher text goes",
            hint="distill into a new tag, or pass --prompt-layer 0 --no-deep to add-task first",
        )
    student = Layout(tok, cfg.template, P)
    if sum(p.kind == "prompt" for p in student.pieces) != 1:
        raise UsageError(
            f"--template {cfg.template!r} has several prompt slots, and distill puts the teacher text in the prompt's "
            "one place",
            hint="use a template with one {prompt}, such as prefix or suffix",
        )
    ids = teacher_ids(tok, teaching.text)
    teacher = Layout(tok, cfg.template, len(ids))
    budget = student.budget(cfg.max_seq_length, teaching.max_new_tokens + 1)
    if budget < 1:
        raise UsageError(f"--max-seq-length {cfg.max_seq_length} leaves no room for text beside the prompt and answer")
    prompt = teacher_prompt(model, ids)
    said, enc = {}, {}
    for split, records in (("train", rows.train[tag]), ("valid", rows.valid[tag])):
        texts = tok([r.text for r in records], add_special_tokens=False).input_ids
        cut = sum(len(t) > budget for t in texts)
        texts = [t[-budget:] for t in texts]
        status(f"the teacher ({len(ids)} tokens) answers the {len(texts)} {split} inputs")
        said[split] = ask(
            model,
            tok,
            prompt,
            [teacher.context(t) for t in texts],
            teaching.max_new_tokens,
            teaching.top_k,
            cfg.batch_size,
            teaching.temperature if split == "train" else 0.0,  # agreement is scored against greedy answers
            cfg.seed,
        )
        contexts = [student.context(t) for t in texts]
        enc[split] = Encoded(
            [c + s.targets for c, s in zip(contexts, said[split])],
            [[IGNORE] * len(c) + s.targets for c, s in zip(contexts, said[split])],
            contexts,
            [s.text for s in said[split]],
            cut,
        )
    task = Task(tag, cfg, enc["train"], enc["valid"], None, teaching.text, list(range(cfg.ensemble)))
    return task, Imitation({tag: (said["train"], said["valid"])}, teaching.max_new_tokens)


def _recorded(teaching: Teaching, teacher_tokens: int, project: ProjectDir) -> Callable[[PromptRecord], PromptRecord]:
    """What a distilled prompt's record says of its teacher: the text's hash and length, never the text."""

    def amend(record: PromptRecord) -> PromptRecord:
        record.init_text = None  # the teacher text stays with its owner; the record keeps its hash
        record.distilled = {
            "teacher_sha256": teaching.sha256,
            "teacher_tokens": teacher_tokens,
            "tokens_saved_per_row": teacher_tokens - project.num_prompt_tokens,
            "max_new_tokens": teaching.max_new_tokens,
            "top_k": teaching.top_k,
            "temperature": teaching.temperature,
            "metrics": "val_acc: greedy answers equal to the teacher's; val_loss: mean KL to the teacher",
        }
        return record

    return amend


def distill(
    project: ProjectDir,
    tag: str,
    cfg: TaskConfig,
    teaching: Teaching,
    reporter: Reporter,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    base: BaseOptions = BaseOptions(),
) -> TuneResult:
    """Distill the teacher text into `tag`'s prompt; resume: True or "auto" as in tune.tune_many."""
    from accelerate import Accelerator

    cfgs = {tag: cfg}
    trackers.require(cfgs)
    acc = Accelerator(cpu=not torch.cuda.is_available(), **trackers.accelerator_options(project, cfgs))
    ckpt_path = checkpoint_path(project, [tag])
    resuming = check_start(project, cfgs, ckpt_path, resume, overwrite)
    started = time.perf_counter()
    rows = read_inputs(cfg, tag)
    inputs = checkpoint.inputs_of(rows, base.dtype, project.base.fingerprint) | teaching.inputs()
    if resume == "auto" and not resuming and (done := finished(project, cfgs, inputs, overwrite)) is not None:
        reporter.status(f"{tag!r} is already distilled with these settings and inputs: nothing to do")
        return done[0]
    model, tok = load_project_base(project.base, base, reporter.status)
    model.to(acc.device)  # every process asks the teacher about every row: any of them may train on any row
    task, imitation = teach(model, tok, tag, cfg, rows, teaching, project.num_prompt_tokens, reporter.status)
    recipe = setup(
        project,
        [task],
        (model, tok),
        acc,
        trackers.watched(reporter, acc, project, cfgs),
        ckpt_path=ckpt_path,
        inputs=inputs,
        resuming=resuming,
        shard_base=False,
        started=started,
        objective=imitation,
    )
    try:
        recipe.train()
    finally:
        recipe.close()
        trackers.finish(acc)
    return write_results(project, recipe, _recorded(teaching, len(teacher_ids(tok, teaching.text)), project))[0]
