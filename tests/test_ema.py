"""--ema: the prompt validated and kept is an exponential moving average of the steps' prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from reference import tune
from test_train import ROWS, Reporter, small_run

from ptcli.config import TaskConfig
from ptcli.errors import ProjectError, UsageError
from ptcli.project import bank
from ptcli.project import manifest as proj
from ptcli.tuning.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECAY = 0.8


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> tuple[Path, TaskConfig]:
    return small_run(tmp_path_factory.mktemp("ema") / "p", lively_llama, ROWS, ema=DECAY)


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The run's prompts (S, P, H): the initial one, then the prompt after each optimizer step."""
    seen: list[torch.Tensor] = []
    initial, step = Recipe.validate_initial, Recipe.step

    def validate_initial(self: Recipe) -> None:
        seen.append(self.prompt().detach().clone())
        initial(self)

    def stepped(self: Recipe, at: int, elapsed: float) -> None:
        step(self, at, elapsed)
        seen.append(self.prompt().detach().clone())

    monkeypatch.setattr(Recipe, "validate_initial", validate_initial)
    monkeypatch.setattr(Recipe, "step", stepped)
    return seen


def test_the_kept_prompt_is_the_average_by_hand(fresh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, cfg = fresh
    p = proj.load(Path(shutil.copytree(src, tmp_path / "p")))
    seen = _recording(monkeypatch)
    result = tune(p, "sent", cfg, Reporter())
    assert len(seen) == 1 + cfg.max_steps
    average = [seen[0]]
    for t in range(cfg.max_steps):  # the decay warms up as (2 + t) / (11 + t) until it reaches --ema
        d = min(DECAY, (2 + t) / (11 + t))
        average.append(d * average[-1] + (1 - d) * seen[t + 1])
    prompt, meta = bank.get(proj.load(p.root), "sent")
    assert meta.best_step == result.best_step > 0
    assert torch.allclose(prompt, average[meta.best_step][0], atol=1e-6, rtol=0)
    assert not torch.allclose(prompt, seen[meta.best_step][0], atol=1e-3)  # not the step's own prompt


def test_resume_reaches_the_uninterrupted_average(fresh, tmp_path: Path) -> None:
    src, cfg = fresh
    full = proj.load(Path(shutil.copytree(src, tmp_path / "full")))
    tune(full, "sent", cfg, Reporter())
    p = proj.load(Path(shutil.copytree(src, tmp_path / "p")))
    with pytest.raises(KeyboardInterrupt):
        tune(p, "sent", cfg, Reporter(stop_at=5))
    other = TaskConfig(**{**cfg.to_dict(), "ema": 0.5})
    with pytest.raises(ProjectError) as info:
        tune(proj.load(p.root), "sent", other, Reporter(), resume=True)
    assert info.value.message == "the interrupted run used other settings (ema)"
    tune(proj.load(p.root), "sent", cfg, Reporter(), resume=True)
    got, meta = bank.get(proj.load(p.root), "sent")
    want, full_meta = bank.get(proj.load(full.root), "sent")
    assert meta.best_step == full_meta.best_step == 6  # so the kept average went through the resumed steps
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_a_bad_decay_names_the_flag(decay: float) -> None:
    with pytest.raises(UsageError, match=rf"--ema must be 0 or more and below 1, got {decay}"):
        TaskConfig(ema=decay)
