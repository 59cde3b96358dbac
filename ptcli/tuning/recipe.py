"""One tuning run in phases that read top to bottom: set up, validate, one step, the loop.

(The shape of torchtune's single-device recipes.) `setup` builds a `Recipe` holding
everything the run needs; its methods only read it and advance `state`, the part a
checkpoint saves. Every (tag, member) is one slot of a single (S, P, H) parameter; each
member draws its own data order over the pooled rows of all tags (`MixedBatches`), and
each row names the slot it trains. Tags keep their own validation and best step.

Data parallel through accelerate: every process takes its slice of each global batch, the
loss is normalised by the global count of labelled tokens, and only the prompts' gradient is
all-reduced, so N processes reach the same prompts as one. Only the main process writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ptcli import preempt
from ptcli.config import TaskConfig
from ptcli.enums import Reparam
from ptcli.errors import UsageError, WriteError
from ptcli.lm.depth import depth_of, num_blocks
from ptcli.project.manifest import ProjectDir, now
from ptcli.project.runs import EvalRow, StepRow
from ptcli.tuning import checkpoint
from ptcli.tuning.batches import MixedBatches
from ptcli.tuning.objective import Answers, Objective
from ptcli.tuning.soft_prompt import SoftPrompt, make_prompt
from ptcli.tuning.states import FrozenStates
from ptcli.tuning.task import Task
from ptcli.tuning.validate import agreed

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _states_bound() -> int:
    """Bytes of a late prompt's frozen states kept in memory: PTCLI_STATES_GIB, else a third of the machine's
    memory, at most 8 GiB."""
    if "PTCLI_STATES_GIB" in os.environ:
        return int(float(os.environ["PTCLI_STATES_GIB"]) * 2**30)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): the cap
        memory = 3 * 8 * 2**30
    return min(8 * 2**30, memory // 3)


class Reporter(Protocol):
    def status(self, message: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, loss: float, lr: float, tokens: int) -> None: ...
    def evaluated(self, step: int, metrics: dict[str, float], tag: str | None = None) -> None: ...


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


@dataclass
class Recipe:
    """Everything a set-up run holds. Only `state` (and the prompt and optimizer) change as it runs."""

    tasks: list[Task]
    reporter: Reporter
    acc: Accelerator
    model: PreTrainedModel  # the frozen base
    tok: PreTrainedTokenizerBase
    prompt: SoftPrompt  # prompt() is (S, P, H): one slot per (tag, member)
    opt: torch.optim.Optimizer
    batches: MixedBatches
    state: checkpoint.State
    ckpt_path: Path
    inputs: dict[str, Any]  # checkpoint.inputs_of: the data and base this run was set up with
    started: float  # time.perf_counter() when the run began
    objective: Objective  # what a step minimises and validation keeps by
    states: FrozenStates | None = None  # a late prompt's rows below its block, kept across steps
    depth: int = 1  # blocks each prompt gives vectors to (a deep prompt: all from --prompt-layer up)
    prior_seconds: float = 0.0  # time the interrupted run spent, when resuming
    saved_step: int | None = None  # the step of the checkpoint on disk, None before the first

    @property
    def run(self) -> TaskConfig:
        """The settings every tag of the run shares (config.check_run_together)."""
        return self.tasks[0].cfg

    def elapsed(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.started

    def validate_initial(self) -> None:
        """Step 0: each tag's initial prompts are its best so far, and its `initial_metrics`."""
        with torch.no_grad():
            self.state.best_prompt = self.prompt().detach().clone()  # (S, P, H)
        if self.run.ema:
            self.state.ema_prompt = self.state.best_prompt.clone()
        for t in self.tasks:
            metrics = self.objective.evaluate(self, self.state.best_prompt[t.slots], t)
            self.state.initial[t.tag] = self.state.best[t.tag] = metrics
            self.state.best_step[t.tag] = 0
            self.reporter.evaluated(0, metrics, t.tag)

    def validate(self) -> None:
        """Score every tag's current prompts (--ema: their average), keep each tag's better ones, and checkpoint."""
        with torch.no_grad():
            current = self.prompt().detach() if self.state.ema_prompt is None else self.state.ema_prompt  # (S, P, H)
        for t in self.tasks:
            metrics = self.objective.evaluate(self, current[t.slots], t)
            self.reporter.evaluated(self.state.step, metrics, t.tag)
            self.state.history.append(EvalRow(self.state.step, t.tag, metrics))
            if self.objective.better(metrics, self.state.best[t.tag]):
                assert self.state.best_prompt is not None  # set by validate_initial, or restored by resume
                self.state.best[t.tag], self.state.best_step[t.tag] = metrics, self.state.step
                self.state.best_prompt[t.slots] = current[t.slots]
        self.save()

    def save(self) -> None:
        if self.acc.is_main_process:
            self.state.seconds = self.elapsed()
            try:
                checkpoint.save(self.ckpt_path, self.prompt, self.opt, self.state)
            except WriteError as e:
                kept = self.saved_step is not None
                raise e.saying(
                    f"the run stopped at step {self.state.step} and nothing reached the bank; "
                    + (f"its checkpoint of step {self.saved_step} is kept" if kept else "it had no checkpoint yet"),
                    hint="free space, then run the same command"
                    + (" with --resume: it continues from that checkpoint" if kept else " again"),
                ) from e
        self.saved_step = self.state.step

    def step(self, step: int, elapsed: float) -> None:
        """One optimizer step on the global batch of `step`; this process computes its share."""
        acc, run = self.acc, self.run
        picks = self.batches.picks(step, acc.process_index, acc.num_processes)
        lr = lr_at(step, run, elapsed)
        for group in self.opt.param_groups:
            group["lr"] = lr * group["peak"] / run.lr
        loss_sum, n, positions = self.objective.loss(self, picks)
        n_global = int(acc.reduce(torch.tensor(n, device=acc.device), "sum"))
        (loss_sum / n_global).backward()
        if acc.num_processes > 1:
            for param in self.prompt.parameters():
                param.grad = acc.reduce(param.grad, "sum")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.state.ema_prompt is not None:  # --ema: the average moves toward the prompt just stepped
            decay = min(run.ema, (2 + step) / (11 + step))  # warmed up as TensorFlow's EMA with num_updates
            with torch.no_grad():
                self.state.ema_prompt.lerp_(self.prompt().detach(), 1 - decay)  # (S, P, H)
        loss = float(acc.reduce(loss_sum.detach(), "sum")) / n_global
        self.reporter.step(step + 1, loss, lr, positions * acc.num_processes)
        self.state.step = step + 1
        self.state.history.append(StepRow(self.state.step, loss, lr))

    def close(self) -> None:
        """What the run held only for itself goes: a late prompt's spilled states."""
        if self.states is not None:
            self.states.close()

    def train(self) -> None:
        """Steps until --max-steps or --max-minutes, validating every --val-check-interval and at the end."""
        run, state = self.run, self.state
        self.reporter.start(run.max_steps, state.step)
        for step in range(state.step, run.max_steps):
            elapsed = self.elapsed()
            if run.max_minutes and agreed(self.acc, elapsed >= 60 * run.max_minutes):
                break
            if agreed(self.acc, preempt.requested()):  # SIGTERM on any process: checkpoint here, every process stops
                self.save()
                self.acc.wait_for_everyone()
                raise preempt.stopped(f"at step {state.step}; checkpoint saved in {self.ckpt_path}")
            self.step(step, elapsed)
            if state.step % run.val_check_interval == 0 or state.step == run.max_steps:
                self.validate()
        validated = any(isinstance(h, EvalRow) and h.step == state.step for h in state.history)
        if state.step > 0 and not validated:
            self.validate()  # stopped by the time budget between validations


def make_optimizer(prompt: SoftPrompt, run: TaskConfig) -> torch.optim.Optimizer:
    """AdamW over the prompts (peak --lr) and any encoder (peak --reparam-lr); `peak` scales the shared schedule."""
    groups = [{"params": [prompt.weight], "peak": run.lr}]
    if run.reparam != Reparam.NONE:
        groups.append({"params": list(prompt.encoders.parameters()), "peak": run.reparam_lr})
    return torch.optim.AdamW(groups, lr=run.lr, weight_decay=0.0)


def setup(
    project: ProjectDir,
    tasks: list[Task],
    base: tuple[Any, Any],
    acc: Any,
    reporter: Reporter,
    *,
    ckpt_path: Path,
    inputs: dict[str, Any],
    resuming: bool,
    shard_base: bool,
    started: float,
    objective: Objective | None = None,
) -> Recipe:
    """Prompts, optimizer and state on the run's device: restored from the checkpoint, or validated at step 0.

    objective: tune's `Answers` unless given (distill's teacher)."""
    model, tok = base
    layer, blocks = tasks[0].cfg.prompt_layer, num_blocks(model)
    if layer >= blocks:
        raise UsageError(f"--prompt-layer {layer} is past the base's last block (it has {blocks}: 0 to {blocks - 1})")
    prompt = make_prompt(model, tok, tasks, project.num_prompt_tokens).to(acc.device)
    if shard_base and acc.num_processes > 1:  # after the fingerprint and the inits, which read whole weights
        from ptcli.dist import shard_frozen_base

        mine, whole = shard_frozen_base(model)
        reporter.status(
            f"sharded the frozen base over {acc.num_processes} processes (FSDP): "
            f"this one holds {100 * mine / whole:.1f}% of its {whole / 2**20:,.1f} MiB of weights"
        )
    model.to(acc.device)
    opt = make_optimizer(prompt, tasks[0].cfg)
    state = checkpoint.State(config={t.tag: t.cfg.to_dict() for t in tasks}, started=now(), inputs=inputs)
    batches = MixedBatches.of(tasks, tasks[0].cfg)
    parts = (tasks, reporter, acc, model, tok, prompt, opt, batches, state, ckpt_path, inputs, started)
    recipe = Recipe(*parts, objective or Answers())
    recipe.depth = depth_of(model, layer, tasks[0].cfg.deep)
    if layer and not (shard_base and acc.num_processes > 1):  # a sharded stack runs whole: no block may be skipped
        recipe.states = _kept_states(
            model, layer, blocks, ckpt_path.with_name(f"frozen-states.{acc.process_index}.bin"), reporter
        )
    if resuming:
        recipe.state = checkpoint.load(ckpt_path, prompt, opt, {t.tag: t.cfg for t in tasks}, inputs)
        recipe.saved_step = recipe.state.step
        reporter.status(f"resuming {'+'.join(t.tag for t in tasks)!r} at step {recipe.state.step}")
    else:
        recipe.validate_initial()
    recipe.prior_seconds = recipe.state.seconds
    return recipe


def _kept_states(model, layer: int, blocks: int, spill: Path, reporter: Reporter) -> FrozenStates:
    """A late prompt's rows below its block, computed once and kept: in memory up to the bound, then in `spill`."""
    bound = _states_bound()
    reporter.status(
        f"the prompt enters before block {layer} of {blocks}: each row's states below it are computed once and "
        f"kept, up to {bound / 2**30:.1f} GiB in memory (PTCLI_STATES_GIB), beyond that in {spill.name} "
        "in the run directory until the run ends"
    )
    return FrozenStates(model, layer, bound, spill)
