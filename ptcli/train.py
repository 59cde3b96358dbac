"""The tuning loop, top to bottom: data, base, prompts, schedule, steps, validation, bank.

A run tunes one tag, or several tags over mixed batches (`--tag A --tag B`), each with
`--ensemble K` members. Every (tag, member) is one slot of a single (S, P, H) parameter;
each member draws its own data order over the pooled rows of all tags, and each row names
the slot it trains. Tags keep their own validation, best step and bank entry.

Data parallel through accelerate: every process takes its slice of each global batch, the
loss is normalised by the global count of labelled tokens, and only the prompts' gradient is
all-reduced, so N processes reach the same prompts as one. Only the main process writes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ptcli import bank, checkpoint, preempt
from ptcli.config import TaskConfig, check_run_together
from ptcli.data import BatchOrder, Record, closed_answers, encode, read_jsonl
from ptcli.errors import CompatibilityError, InputError, ProjectError
from ptcli.forward import lm_loss
from ptcli.model import fingerprint, init_prompt, load_base
from ptcli.project import Project, now
from ptcli.reparam import SoftPrompt
from ptcli.validate import Task, agreed, better, evaluate


class Reporter(Protocol):
    def status(self, message: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, loss: float, lr: float, tokens: int) -> None: ...
    def evaluated(self, step: int, metrics: dict[str, float], tag: str | None = None) -> None: ...


@dataclass
class TuneResult:
    tag: str
    steps: int
    best_step: int
    metrics: dict[str, float]
    initial_metrics: dict[str, float]
    seconds: float
    truncated: int
    path: str
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_at(step: int, cfg: TaskConfig, elapsed: float = 0.0) -> float:
    """NeMo's warmup-hold-cosine: linear warmup, hold at --lr, cosine decay to --min-lr at --max-steps.

    Under --max-minutes the decay ends at whichever comes first, the last step or the time budget.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    held = cfg.warmup_steps + cfg.constant_steps
    if step < held:
        return cfg.lr
    progress = (step - held) / max(1, cfg.max_steps - held)
    if cfg.max_minutes:
        progress = max(progress, elapsed / (60 * cfg.max_minutes))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def tune(project: Project, tag: str, cfg: TaskConfig, reporter: Reporter, **options) -> TuneResult:
    """Tune one tag; see tune_many."""
    return tune_many(project, {tag: cfg}, reporter, **options)[0]


def tune_many(
    project: Project,
    cfgs: dict[str, TaskConfig],
    reporter: Reporter,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    shard_base: bool = False,
) -> list[TuneResult]:
    """Tune every tag of `cfgs` in one run. shard_base: FSDP-shard the frozen base over the processes.

    resume: True continues the interrupted run; "auto" does when there is one, starts afresh when there is
    none, and returns the bank's entries when this run already finished (same settings and data).
    """
    from accelerate import Accelerator

    check_run_together(cfgs)
    run = next(iter(cfgs.values()))  # the settings every tag of the run shares
    acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo when launched with several processes
    main = acc.is_main_process
    ckpt_path = checkpoint.path(project, list(cfgs))
    auto = resume == "auto"
    if auto:
        resume = ckpt_path.exists()
    if resume and not ckpt_path.exists():
        raise ProjectError(
            f"no interrupted run of {'+'.join(cfgs)!r} to resume ({ckpt_path} is missing)", hint="drop --resume"
        )
    for tag in cfgs:
        if bank.path_of(project, tag).exists() and not (resume or overwrite or auto):
            raise ProjectError(
                f"tag {tag!r} is already tuned",
                hint="pass --overwrite to retune it, or --resume to continue a killed run",
            )

    started = time.perf_counter()
    train_rows, valid_rows = read_split(cfgs, "train"), read_split(cfgs, "valid")
    inputs = checkpoint.inputs_of({"train": train_rows, "valid": valid_rows}, dtype, project.base.fingerprint)
    if auto and not resume and (done := checkpoint.finished(project, cfgs, inputs, overwrite)) is not None:
        reporter.status(f"{'+'.join(cfgs)!r} is already tuned with these settings and data: nothing to do")
        return [TuneResult(**r) for r in done]
    model, tok = load_base(project.base.ref, dtype, trust_remote_code, reporter.status)
    if fingerprint(model) != project.base.fingerprint:
        raise CompatibilityError(
            f"the base model at {project.base.ref!r} has changed since `ptcli init` (fingerprint mismatch)",
            hint="its prompts would not fit it; init a new project for the new weights",
        )
    P, K = project.num_prompt_tokens, run.ensemble
    tasks = []
    for n, (tag, cfg) in enumerate(cfgs.items()):
        train, valid = train_rows[tag], valid_rows[tag]
        tasks.append(
            Task(
                tag,
                cfg,
                encode(tok, train, P, cfg.max_seq_length, cfg.answer_only, source=cfg.train, template=cfg.template),
                encode(tok, valid, P, cfg.max_seq_length, cfg.answer_only, source=cfg.valid, template=cfg.template),
                closed_answers(train),
                cfg.init_text or " ".join(sorted({r.answer for r in train if r.answer})[:100]),
                list(range(n * K, (n + 1) * K)),
            )
        )
    truncated = sum(t.train.truncated + t.valid.truncated for t in tasks)
    if truncated:
        reporter.status(f"cut {truncated} long text(s) from the left to fit --max-seq-length")

    inits = [
        init_prompt(model, tok, P, t.cfg.init, t.init_text, run.seed + k, t.choices) for t in tasks for k in range(K)
    ]
    prompt = SoftPrompt(torch.stack(inits), run.reparam, seed=run.seed).to(
        acc.device
    )  # (S, P, H): one slot per (tag, member)
    if shard_base and acc.num_processes > 1:  # after the fingerprint and the inits, which read whole weights
        from ptcli.dist import shard_frozen_base

        mine, whole = shard_frozen_base(model)
        reporter.status(
            f"sharded the frozen base over {acc.num_processes} processes (FSDP): "
            f"this one holds {100 * mine / whole:.1f}% of its {whole / 2**20:,.1f} MiB of weights"
        )
    model.to(acc.device)
    groups = [{"params": [prompt.weight], "peak": run.lr}]
    if run.reparam != "none":
        groups.append({"params": list(prompt.encoders.parameters()), "peak": run.reparam_lr})
    opt = torch.optim.AdamW(groups, lr=run.lr, weight_decay=0.0)
    state = checkpoint.State(config={t.tag: t.cfg.to_dict() for t in tasks}, started=now(), inputs=inputs)
    if resume:
        state = checkpoint.load(ckpt_path, prompt, opt, cfgs, inputs)
        reporter.status(f"resuming {'+'.join(cfgs)!r} at step {state.step}")
    else:
        with torch.no_grad():
            state.best_prompt = prompt().detach().clone()  # (S, P, H)
        for t in tasks:
            state.initial[t.tag] = state.best[t.tag] = evaluate(
                model, tok, state.best_prompt[t.slots], t, run.batch_size, acc
            )
            state.best_step[t.tag] = 0
            reporter.evaluated(0, state.initial[t.tag], t.tag)

    def validate() -> None:
        with torch.no_grad():
            current = prompt().detach()  # (S, P, H)
        for t in tasks:
            metrics = evaluate(model, tok, current[t.slots], t, run.batch_size, acc)
            reporter.evaluated(state.step, metrics, t.tag)
            state.history.append({"step": state.step, "tag": t.tag, **metrics})
            if better(metrics, state.best[t.tag]):
                state.best[t.tag], state.best_step[t.tag] = metrics, state.step
                state.best_prompt[t.slots] = current[t.slots]
        save()

    def save() -> None:
        if main:
            state.seconds = prior_seconds + time.perf_counter() - started
            checkpoint.save(ckpt_path, prompt, opt, state)

    prior_seconds = state.seconds  # time spent by the interrupted run, when resuming
    pool = [(t, i) for t in tasks for i in range(len(t.train.ids))]  # every tag's rows, mixed
    lengths = [len(t.train.ids[i]) for t, i in pool] if run.group_by_length else None
    orders = [BatchOrder(len(pool), run.batch_size, run.seed + k, lengths) for k in range(K)]  # member k's data order
    reporter.start(run.max_steps, state.step)
    for step in range(state.step, run.max_steps):
        elapsed = prior_seconds + time.perf_counter() - started
        if run.max_minutes and agreed(acc, elapsed >= 60 * run.max_minutes):
            break
        if agreed(acc, preempt.requested()):  # SIGTERM on any process: checkpoint here, every process stops
            save()
            acc.wait_for_everyone()
            raise preempt.stopped(f"at step {state.step}; checkpoint saved in {ckpt_path}")
        picks = [(*pool[j], k) for k, order in enumerate(orders) for j in order.batch(step)][
            acc.process_index :: acc.num_processes
        ]
        lr = lr_at(step, run, elapsed)
        for group in opt.param_groups:
            group["lr"] = lr * group["peak"] / run.lr
        loss_sum, n = lm_loss(
            model,
            prompt(),
            [t.train.ids[i] for t, i, _ in picks],
            [t.train.labels[i] for t, i, _ in picks],
            tok.pad_token_id,
            which=[t.slots[k] for t, _, k in picks],
        )
        n_global = int(acc.reduce(torch.tensor(n, device=acc.device), "sum"))
        (loss_sum / n_global).backward()
        if acc.num_processes > 1:
            for param in prompt.parameters():
                param.grad = acc.reduce(param.grad, "sum")
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(acc.reduce(loss_sum.detach(), "sum")) / n_global
        positions = sum(
            len(t.train.ids[i]) + P * (min(t.train.ids[i]) >= 0) for t, i, _ in picks
        )  # template rows hold their slots
        reporter.step(step + 1, loss, lr, positions * acc.num_processes)
        state.step = step + 1
        state.history.append({"step": state.step, "loss": loss, "lr": lr})
        if state.step % run.val_check_interval == 0 or state.step == run.max_steps:
            validate()
    if not any(h.get("step") == state.step and "tag" in h for h in state.history) and state.step > 0:
        validate()  # stopped by the time budget between validations

    seconds = prior_seconds + time.perf_counter() - started
    results = []
    for t in tasks:
        results.append(
            TuneResult(
                tag=t.tag,
                steps=state.step,
                best_step=state.best_step[t.tag],
                metrics=state.best[t.tag],
                initial_metrics=state.initial[t.tag],
                seconds=seconds,
                truncated=t.train.truncated + t.valid.truncated,
                path=str(bank.path_of(project, t.tag)),
                history=[h for h in state.history if h.get("tag", t.tag) == t.tag],
            )
        )
        if main:
            meta = {
                "init": t.cfg.init,
                "init_text": t.init_text if t.cfg.init == "text" else None,
                "choices": t.choices,
                "mode": "rank" if t.choices else "generate",  # what `better` kept the prompt by; infer's default
                "ensemble": K,
                "tuned_with": [o for o in cfgs if o != t.tag],
                "config": t.cfg.to_dict(),
                "steps": state.step,
                "best_step": state.best_step[t.tag],
                "metrics": state.best[t.tag],
                "initial_metrics": state.initial[t.tag],
                "train_seconds": round(seconds, 2),
                "world_size": acc.num_processes,
                "inputs": inputs,
                "created": state.started,
                "updated": now(),
            }
            best = state.best_prompt[t.slots]  # (K, P, H)
            bank.put(project, t.tag, best[0] if K == 1 else best, meta)
            checkpoint.write_log(project, t.tag, state.history)
            checkpoint.append_run(project, {"tag": t.tag, **{k: v for k, v in meta.items() if k != "init_text"}})
            project.record_task(t.tag, t.cfg)
    if main:
        ckpt_path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    return results
