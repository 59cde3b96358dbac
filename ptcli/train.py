"""The tuning loop, top to bottom: data, base, prompt, schedule, steps, validation, bank.

Data parallel through accelerate: every process takes its slice of each global batch, the
loss is normalised by the global count of labelled tokens, and only the prompt's gradient is
all-reduced, so N processes reach the same prompt as one. Only the main process writes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ptcli import bank, checkpoint
from ptcli.config import TaskConfig
from ptcli.data import BatchOrder, Encoded, encode, read_jsonl
from ptcli.errors import CompatibilityError, ProjectError
from ptcli.model import SoftPrompt, fingerprint, greedy, init_prompt, lm_loss, load_base
from ptcli.project import Project, now


class Reporter(Protocol):
    def status(self, message: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, loss: float, lr: float, tokens: int) -> None: ...
    def evaluated(self, step: int, metrics: dict[str, float]) -> None: ...


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


def lr_at(step: int, cfg: TaskConfig) -> float:
    """NeMo's warmup-hold-cosine: linear warmup, hold at --lr, cosine decay to --min-lr at --max-steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    held = cfg.warmup_steps + cfg.constant_steps
    if step < held:
        return cfg.lr
    progress = (step - held) / max(1, cfg.max_steps - held)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def evaluate(model, tok, prompt: torch.Tensor, enc: Encoded, batch_size: int, acc) -> dict[str, float]:
    """Validation loss per token and exact-match accuracy of greedy answers, over all processes."""
    shard = list(range(acc.process_index, len(enc.ids), acc.num_processes))
    shard.sort(key=lambda i: len(enc.ids[i]))  # similar lengths together: less padding
    max_new = max(len(ids) - len(text) for ids, text in zip(enc.ids, enc.prompts))  # longest answer + eos, already tokenized
    loss_sum, count, correct = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(shard), batch_size):
            idx = shard[start : start + batch_size]
            s, n = lm_loss(model, prompt, [enc.ids[i] for i in idx], [enc.labels[i] for i in idx], tok.pad_token_id)
            loss_sum, count = loss_sum + float(s), count + n
            outs = greedy(model, prompt, [enc.prompts[i] for i in idx], tok.pad_token_id, tok.eos_token_id, max_new)
            for i, out in zip(idx, outs):
                correct += tok.decode(out, skip_special_tokens=True).strip() == enc.answers[i].strip()
    totals = acc.reduce(torch.tensor([loss_sum, count, correct], dtype=torch.float64, device=acc.device), "sum")
    loss_sum, count, correct = totals.tolist()
    return {"val_loss": loss_sum / max(count, 1), "val_acc": correct / len(enc.ids)}


def better(new: dict[str, float], best: dict[str, float] | None) -> bool:
    """Higher accuracy wins; equal accuracy goes to lower loss."""
    return best is None or (new["val_acc"], -new["val_loss"]) > (best["val_acc"], -best["val_loss"])


def tune(
    project: Project,
    tag: str,
    cfg: TaskConfig,
    reporter: Reporter,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> TuneResult:
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo when launched with several processes
    main = acc.is_main_process
    exists = bank.path_of(project, tag).exists()
    ckpt_path = checkpoint.path(project, tag)
    if resume and not ckpt_path.exists():
        raise ProjectError(f"no interrupted run of {tag!r} to resume ({ckpt_path} is missing)", hint="drop --resume")
    if exists and not (resume or overwrite):
        raise ProjectError(f"tag {tag!r} is already tuned", hint="pass --overwrite to retune it, or --resume to continue a killed run")

    started = time.perf_counter()
    train = read_jsonl(cfg.train, training=True, tag=tag)
    valid = read_jsonl(cfg.valid, training=True, tag=tag)
    model, tok = load_base(project.base.ref, dtype, trust_remote_code, reporter.status)
    if fingerprint(model) != project.base.fingerprint:
        raise CompatibilityError(
            f"the base model at {project.base.ref!r} has changed since `ptcli init` (fingerprint mismatch)",
            hint="its prompts would not fit it; init a new project for the new weights",
        )
    model.to(acc.device)
    P = project.num_prompt_tokens
    tr = encode(tok, train, P, cfg.max_seq_length, cfg.answer_only, source=cfg.train)
    va = encode(tok, valid, P, cfg.max_seq_length, cfg.answer_only, source=cfg.valid)
    if tr.truncated or va.truncated:
        reporter.status(f"cut {tr.truncated + va.truncated} long text(s) from the left to fit --max-seq-length")

    init_text = cfg.init_text or " ".join(sorted({r.answer for r in train if r.answer})[:100])
    prompt = SoftPrompt(init_prompt(model, tok, P, cfg.init, init_text, cfg.seed)).to(acc.device)
    opt = torch.optim.AdamW(prompt.parameters(), lr=cfg.lr, weight_decay=0.0)
    state = checkpoint.State(config=cfg.to_dict(), started=now())
    if resume:
        state = checkpoint.load(ckpt_path, prompt, opt, cfg)
        reporter.status(f"resuming {tag!r} at step {state.step}")
    else:
        state.initial = evaluate(model, tok, prompt.weight.detach(), va, cfg.batch_size, acc)
        reporter.evaluated(0, state.initial)
        state.best, state.best_prompt = state.initial, prompt.weight.detach().clone()

    prior_seconds = state.seconds  # time spent by the interrupted run, when resuming
    order = BatchOrder(len(tr.ids), cfg.batch_size, cfg.seed)
    reporter.start(cfg.max_steps, state.step)
    for step in range(state.step, cfg.max_steps):
        idx = order.batch(step)[acc.process_index :: acc.num_processes]
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum, n = lm_loss(model, prompt(), [tr.ids[i] for i in idx], [tr.labels[i] for i in idx], tok.pad_token_id)
        n_global = int(acc.reduce(torch.tensor(n, device=acc.device), "sum"))
        (loss_sum / n_global).backward()
        if acc.num_processes > 1:
            prompt.weight.grad = acc.reduce(prompt.weight.grad, "sum")
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(acc.reduce(loss_sum.detach(), "sum")) / n_global
        reporter.step(step + 1, loss, lr, sum(len(tr.ids[i]) + P for i in idx) * acc.num_processes)
        state.step = step + 1
        state.history.append({"step": state.step, "loss": loss, "lr": lr})
        if state.step % cfg.val_check_interval == 0 or state.step == cfg.max_steps:
            metrics = evaluate(model, tok, prompt.weight.detach(), va, cfg.batch_size, acc)
            reporter.evaluated(state.step, metrics)
            state.history.append({"step": state.step, **metrics})
            if better(metrics, state.best):
                state.best, state.best_step, state.best_prompt = metrics, state.step, prompt.weight.detach().clone()
            if main:
                state.seconds = prior_seconds + time.perf_counter() - started
                checkpoint.save(ckpt_path, prompt, opt, state)

    result = TuneResult(
        tag=tag,
        steps=state.step,
        best_step=state.best_step,
        metrics=state.best,
        initial_metrics=state.initial,
        seconds=prior_seconds + time.perf_counter() - started,
        truncated=tr.truncated + va.truncated,
        path=str(bank.path_of(project, tag)),
        history=state.history,
    )
    if main:
        meta = {
            "init": cfg.init,
            "init_text": init_text if cfg.init == "text" else None,
            "config": cfg.to_dict(),
            "steps": result.steps,
            "best_step": result.best_step,
            "metrics": result.metrics,
            "initial_metrics": result.initial_metrics,
            "train_seconds": round(result.seconds, 2),
            "world_size": acc.num_processes,
            "created": state.started,
            "updated": now(),
        }
        bank.put(project, tag, state.best_prompt, meta)
        checkpoint.write_log(project, tag, state.history)
        checkpoint.append_run(project, {"tag": tag, **{k: v for k, v in meta.items() if k != "init_text"}})
        project.record_task(tag, cfg)
        ckpt_path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    return result
