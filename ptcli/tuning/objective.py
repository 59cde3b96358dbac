"""What a tuning run optimises and keeps prompts by, as one object the recipe calls.

`Answers` is tune's: the answer's LM loss or the answer set's cross-entropy (--loss), each tag's
prompt kept by its validation accuracy. distill.py's `Imitation` is the other: the KL divergence to
a teacher's next-token distributions, kept by agreement with the teacher's answers. The recipe
itself (schedule, data order, resume, data parallel, best step) is the same for both.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ptcli.config import TaskConfig
from ptcli.lm.depth import entering
from ptcli.tuning.loss import batch_loss, step_rows
from ptcli.tuning.soft_prompt import SoftPrompt
from ptcli.tuning.states import FrozenStates
from ptcli.tuning.task import Task
from ptcli.tuning.validate import better, evaluate, evaluate_kept, keeps_states


class Running(Protocol):
    """What an objective reads of the run (recipe.Recipe is one)."""

    model: Any  # the frozen base
    tok: Any
    acc: Any
    prompt: SoftPrompt
    states: FrozenStates | None
    depth: int

    @property
    def run(self) -> TaskConfig: ...


class Objective(Protocol):
    """What a step minimises and what validation keeps prompts by."""

    def loss(self, recipe: Running, picks: list[tuple[Task, int, int]]) -> tuple[torch.Tensor, int, int]:
        """(summed loss, count it is normalised by, positions run) of this process's picks."""
        ...

    def evaluate(self, recipe: Running, prompts: torch.Tensor, task: Task) -> dict[str, float]:
        """A tag's validation metrics for its prompts (K, P, H), over all processes."""
        ...

    def better(self, new: dict[str, float], best: dict[str, float] | None) -> bool: ...


class Answers:
    """tune's objective: the answer's LM loss or the answer set's cross-entropy (--loss); kept by accuracy."""

    def loss(self, recipe: Running, picks: list[tuple[Task, int, int]]) -> tuple[torch.Tensor, int, int]:
        run, model = recipe.run, recipe.model
        rows = step_rows(picks, run.loss)
        with entering(model, run.prompt_layer, recipe.depth):
            loss_sum, n = batch_loss(
                model,
                recipe.prompt(),
                rows,
                run.loss,
                recipe.tok.pad_token_id,
                recipe.states,
                run.prompt_layer,
                recipe.depth,
            )
        P = recipe.prompt.weight.shape[-2] // recipe.depth
        positions = sum(len(row) + P * (min(row) >= 0) for row in rows.seqs)  # template rows hold their slots
        return loss_sum, n, positions

    def evaluate(self, recipe: Running, prompts: torch.Tensor, task: Task) -> dict[str, float]:
        run, model = recipe.run, recipe.model
        with entering(model, run.prompt_layer, recipe.depth):
            if recipe.states is not None and run.prompt_layer and keeps_states(task, prompts):
                return evaluate_kept(
                    model, prompts, task, recipe.states, run.prompt_layer, recipe.depth, run.batch_size, recipe.acc
                )
            return evaluate(model, recipe.tok, prompts, task, run.batch_size, recipe.acc)

    def better(self, new: dict[str, float], best: dict[str, float] | None) -> bool:
        return better(new, best)
