"""The learning-rate schedule, and resuming an interrupted run to the same prompt as an uninterrupted one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import tune

from ptcli.api import init_project
from ptcli.config import TaskConfig
from ptcli.errors import ProjectError, UsageError
from ptcli.project import bank, runs
from ptcli.project import manifest as proj
from ptcli.tuning.recipe import lr_at
from ptcli.tuning.tune import tune_many
from ptcli.tuning.validate import better

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P_TOKENS = 4  # the fixture project's prompt length

# ---------------------------------------------------------------- schedule


def test_lr_schedule_by_hand() -> None:
    cfg = TaskConfig(lr=1.0, min_lr=0.1, warmup_steps=4, constant_steps=3, max_steps=17)
    # warmup: (step + 1) / 4 of the peak
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # hold at the peak for the 3 constant steps; decay starts from the peak too
    assert [lr_at(s, cfg) for s in range(4, 8)] == [1.0, 1.0, 1.0, 1.0]
    # cosine over the remaining 10 steps: halfway is the mean of lr and min_lr
    assert lr_at(12, cfg) == pytest.approx(0.55)
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_at(17, cfg) == pytest.approx(0.1)
    assert lr_at(40, cfg) == pytest.approx(0.1)  # stays at min_lr past the end


def test_lr_without_warmup_starts_at_peak() -> None:
    cfg = TaskConfig(lr=0.5, min_lr=0.0, warmup_steps=0, constant_steps=0, max_steps=4)
    assert [lr_at(s, cfg) for s in range(5)] == pytest.approx(
        [0.5, 0.5 * 0.5 * (1 + math.cos(math.pi / 4)), 0.25, 0.5 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    )


def test_lr_never_decays_when_warmup_and_hold_outlast_the_run() -> None:
    cfg = TaskConfig(lr=2e-3, min_lr=2e-6, warmup_steps=320, constant_steps=2240, max_steps=1000)
    assert lr_at(0, cfg) == pytest.approx(2e-3 / 320)
    assert lr_at(159, cfg) == pytest.approx(1e-3)
    assert all(lr_at(s, cfg) == pytest.approx(2e-3) for s in range(319, cfg.max_steps))


@settings(max_examples=60, deadline=None)
@given(
    warmup=st.integers(0, 20),
    constant=st.integers(0, 20),
    decay=st.integers(1, 60),
    lr=st.floats(1e-4, 1.0),
    frac=st.floats(0.0, 1.0),
)
def test_lr_warms_up_then_decays_monotonically(warmup, constant, decay, lr, frac) -> None:
    cfg = TaskConfig(
        lr=lr, min_lr=lr * frac, warmup_steps=warmup, constant_steps=constant, max_steps=warmup + constant + decay
    )
    lrs = [lr_at(s, cfg) for s in range(cfg.max_steps + 1)]
    held = warmup + constant
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert lrs[max(warmup - 1, 0) : held + 1] == pytest.approx([lr] * (held + 1 - max(warmup - 1, 0)))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[held:], lrs[held + 1 :]))
    assert all(0 < x <= lr * (1 + 1e-12) for x in lrs[:held])
    assert all(cfg.min_lr - 1e-12 <= x <= lr * (1 + 1e-12) for x in lrs[held:])
    assert lrs[-1] == pytest.approx(cfg.min_lr, abs=1e-12)


def test_better_prefers_accuracy_then_loss() -> None:
    assert better({"val_acc": 0.5, "val_loss": 9.0}, {"val_acc": 0.4, "val_loss": 1.0})
    assert better({"val_acc": 0.5, "val_loss": 1.0}, {"val_acc": 0.5, "val_loss": 2.0})
    assert not better({"val_acc": 0.5, "val_loss": 2.0}, {"val_acc": 0.5, "val_loss": 2.0})
    assert better({"val_acc": 0.0, "val_loss": 5.0}, None)


# ---------------------------------------------------------------- resume


class Reporter:
    """Records what tune reports; `stop_at` makes step() raise KeyboardInterrupt, as Ctrl-C would."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at = stop_at
        self.steps: list[int] = []
        self.evaluations: list[int] = []
        self.started: tuple[int, int] | None = None

    def status(self, message: str) -> None:
        pass

    def start(self, total: int, done: int) -> None:
        self.started = (total, done)

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        if step == self.stop_at:
            raise KeyboardInterrupt
        self.steps.append(step)

    def evaluated(self, step: int, metrics: dict[str, float], tag: str | None = None) -> None:
        self.evaluations.append(step)


# Six different answers: no closed answer set, so the best prompt is picked by greedy accuracy then loss
ROWS = [
    ("i love it", "positive"),
    ("i hate it", "negative"),
    ("i really like the movie", "good"),
    ("i dislike the food", "bad"),
    ("i adore this", "great"),
    ("i loathe the phone", "awful"),
]


def small_run(root: Path, base: Path, rows: list[tuple[str, str]], **settings) -> tuple[Path, TaskConfig]:
    """A 4-token project on `base` at `root`, and a 6-step run of tag 'sent' validated on its training rows."""
    init_project(root, str(base), 4)
    data = root.parent / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt_tag": "sent", "text": t, "answer": a}) + "\n" for t, a in rows))
    # validation on the training rows: the loss falls, so the best prompt is a late one
    cfg = TaskConfig(
        train=str(data),
        valid=str(data),
        max_steps=6,
        val_check_interval=2,
        warmup_steps=1,
        batch_size=4,
        lr=0.1,
        min_lr=0.01,
        max_seq_length=64,
        seed=3,
        **settings,
    )
    return root, cfg


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> tuple[Path, TaskConfig]:
    return small_run(tmp_path_factory.mktemp("train") / "p", lively_llama, ROWS)


@pytest.fixture(scope="module")
def uninterrupted(fresh, tmp_path_factory: pytest.TempPathFactory):
    src, cfg = fresh
    root = Path(shutil.copytree(src, tmp_path_factory.mktemp("a") / "p"))
    rep = Reporter()
    result = tune(proj.load(root), "sent", cfg, rep)
    assert rep.steps == [1, 2, 3, 4, 5, 6] and rep.evaluations == [0, 2, 4, 6]
    prompt, meta = bank.get(proj.load(root), "sent")
    assert meta.best_step == 6  # so the compared prompt went through the resumed steps
    return root, result, prompt


def _ckpt_step(p: proj.ProjectDir) -> int:
    from safetensors import safe_open

    with safe_open(str(runs.checkpoint_path(p, "sent")), framework="pt") as f:
        return json.loads(f.metadata()["ptcli"])["step"]


def test_resume_reaches_the_uninterrupted_prompt(fresh, uninterrupted, tmp_path: Path) -> None:
    src, cfg = fresh
    _, full, full_prompt = uninterrupted
    p = proj.load(Path(shutil.copytree(src, tmp_path / "p")))

    with pytest.raises(KeyboardInterrupt):
        tune(p, "sent", cfg, Reporter(stop_at=5))
    assert not bank.path_of(p, "sent").exists()
    assert bank.tags(p) == []
    assert _ckpt_step(p) == 4  # the last validation before the interrupt
    assert "sent" not in proj.load(p.root).tasks

    rep = Reporter()
    result = tune(proj.load(p.root), "sent", cfg, rep, resume=True)
    assert rep.started == (6, 4) and rep.steps == [5, 6] and rep.evaluations == [6]
    prompt, meta = bank.get(proj.load(p.root), "sent")
    assert torch.allclose(prompt, full_prompt, atol=1e-6, rtol=0)
    assert (result.steps, result.best_step) == (full.steps, full.best_step) == (6, 6)
    assert [h.step for h in result.history] == [h.step for h in full.history]
    for got, want in zip((h.to_json() for h in result.history), (h.to_json() for h in full.history)):
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], abs=1e-6) for k in got)
    assert not runs.checkpoint_path(p, "sent").exists()  # cleaned up once the bank has the prompt


def test_interrupted_retune_leaves_the_bank_unchanged(uninterrupted, fresh, tmp_path: Path) -> None:
    src_done, _, full_prompt = uninterrupted
    _, cfg = fresh
    p = proj.load(Path(shutil.copytree(src_done, tmp_path / "p")))
    before = bank.path_of(p, "sent").read_bytes()

    with pytest.raises(KeyboardInterrupt):
        tune(p, "sent", cfg, Reporter(stop_at=3), overwrite=True)
    assert bank.path_of(p, "sent").read_bytes() == before
    assert _ckpt_step(p) == 2

    other = TaskConfig(**{**cfg.to_dict(), "lr": 0.2, "seed": 4})
    with pytest.raises(ProjectError) as info:
        tune(p, "sent", other, Reporter(), resume=True)
    assert info.value.message == "the interrupted run used other settings (lr, seed)"
    assert bank.path_of(p, "sent").read_bytes() == before

    tune(p, "sent", cfg, Reporter(), resume=True)
    prompt, _ = bank.get(proj.load(p.root), "sent")
    assert torch.allclose(prompt, full_prompt, atol=1e-6, rtol=0)


def test_resume_without_a_checkpoint(uninterrupted, fresh) -> None:
    root, _, _ = uninterrupted
    _, cfg = fresh
    with pytest.raises(ProjectError, match="no interrupted run of 'sent' to resume") as info:
        tune(proj.load(root), "sent", cfg, Reporter(), resume=True)
    assert info.value.hint == "drop --resume"


def test_every_finished_run_appends_one_line_to_the_history(tmp_path, tiny_llama, tiny_data) -> None:
    from typer.testing import CliRunner

    from ptcli.cli.app import app

    root = tmp_path / "p"
    runner = CliRunner()
    assert (
        runner.invoke(app, ["init", str(root), "--base", str(tiny_llama), "--num-prompt-tokens", "4", "-q"]).exit_code
        == 0
    )
    args = [
        "tune",
        "-p",
        str(root),
        "--tag",
        "sent",
        "--train",
        str(tiny_data.train),
        "--valid",
        str(tiny_data.valid),
        "--max-steps",
        "2",
        "-q",
    ]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args, "--overwrite", "--max-steps", "3"]).exit_code == 0
    lines = [json.loads(x) for x in (root / "runs" / "history.jsonl").read_text().splitlines()]
    assert [(x["tag"], x["steps"]) for x in lines] == [("sent", 2), ("sent", 3)]
    assert all("metrics" in x and "config" in x for x in lines)


# ---------------------------------------------------------------- ensembles, several tags, time budget

MIXED = [
    ("sent", "i love it", "positive"),
    ("topic", "the team won the game", "sports"),
    ("sent", "i hate it", "negative"),
    ("topic", "fresh bread and soup", "food"),
    ("sent", "i adore this", "positive"),
    ("topic", "a goal in the final", "sports"),
    ("sent", "i loathe the phone", "negative"),
    ("topic", "pasta for dinner", "food"),
]


@pytest.fixture(scope="module")
def mixed(fresh, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, TaskConfig]]:
    src, cfg = fresh
    root = Path(shutil.copytree(src, tmp_path_factory.mktemp("mixed") / "p"))
    data = root.parent / "mixed.jsonl"
    data.write_text("".join(json.dumps({"prompt_tag": g, "text": t, "answer": a}) + "\n" for g, t, a in MIXED))
    shared = TaskConfig(**{**cfg.to_dict(), "train": str(data), "valid": str(data), "ensemble": 2})
    return root, {"sent": shared, "topic": TaskConfig(**{**shared.to_dict(), "init": "labels"})}


def test_several_tags_with_ensembles_in_one_run(mixed, tmp_path: Path) -> None:
    src, cfgs = mixed
    p = proj.load(Path(shutil.copytree(src, tmp_path / "p")))
    rep = Reporter()
    results = tune_many(p, cfgs, rep)
    assert [r.tag for r in results] == ["sent", "topic"] and rep.evaluations == [0, 0, 2, 2, 4, 4, 6, 6]
    for r in results:
        prompt, meta = bank.get(proj.load(p.root), r.tag)
        assert prompt.shape == (2, P_TOKENS, prompt.shape[-1]) and meta.ensemble == 2
        assert not torch.equal(prompt[0], prompt[1])  # own data orders: the members differ
        assert meta.choices == sorted({a for g, _, a in MIXED if g == r.tag})
        assert meta.tuned_with == [t for t in cfgs if t != r.tag] and meta.steps == 6
        log = [json.loads(line) for line in (p.run_dir(r.tag) / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in log if "val_loss" in h] == [2, 4, 6] and all("tag" not in h for h in log)
        assert [h for h in log if "val_loss" in h] == [
            {k: v for k, v in h.to_json().items() if k != "tag"} for h in r.history if isinstance(h, runs.EvalRow)
        ]
    assert set(proj.load(p.root).tasks) == {"sent", "topic"}
    assert not runs.checkpoint_path(p, ["sent", "topic"]).exists()


def test_several_tags_resume_to_the_uninterrupted_prompts(mixed, tmp_path: Path) -> None:
    src, cfgs = mixed
    full = proj.load(Path(shutil.copytree(src, tmp_path / "full")))
    tune_many(full, cfgs, Reporter())
    p = proj.load(Path(shutil.copytree(src, tmp_path / "p")))
    with pytest.raises(KeyboardInterrupt):
        tune_many(p, cfgs, Reporter(stop_at=3))
    assert bank.tags(p) == [] and runs.checkpoint_path(p, ["sent", "topic"]).exists()
    tune_many(proj.load(p.root), cfgs, Reporter(), resume=True)
    for tag in cfgs:
        got, _ = bank.get(proj.load(p.root), tag)
        want, _ = bank.get(proj.load(full.root), tag)
        assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_tags_tuned_together_share_their_run_settings(mixed) -> None:
    src, cfgs = mixed
    odd = {**cfgs, "topic": TaskConfig(**{**cfgs["topic"].to_dict(), "lr": 0.5, "batch_size": 2})}
    with pytest.raises(UsageError) as info:
        tune_many(proj.load(src), odd, Reporter())
    assert info.value.message == (
        "tags tuned together must share their run settings (--batch-size: sent=4, topic=2; --lr: sent=0.1, topic=0.5)"
    )


def test_time_budget_stops_early_and_keeps_the_best(fresh, tmp_path: Path) -> None:
    src, cfg = fresh
    p = proj.load(Path(shutil.copytree(src, tmp_path / "p")))
    rep = Reporter()
    result = tune(p, "sent", TaskConfig(**{**cfg.to_dict(), "max_steps": 10_000, "max_minutes": 1e-9}), rep)
    assert (
        result.steps == 0 and rep.steps == [] and rep.evaluations == [0]
    )  # the budget was spent before the first step
    assert bank.get(proj.load(p.root), "sent")[1].steps == 0


def test_time_budget_drives_the_decay() -> None:
    cfg = TaskConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=1000, max_minutes=1.0)
    assert lr_at(10, cfg, elapsed=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.01)))  # steps lead
    assert lr_at(10, cfg, elapsed=30.0) == pytest.approx(0.5)  # half the budget spent: half way down
    assert lr_at(10, cfg, elapsed=90.0) == pytest.approx(0.0)


def test_validation_loss_from_the_ranking_pass_equals_the_loss(mixed, llama) -> None:
    from reference import plain_lm_loss

    from ptcli.data.encode import closed_answers, encode
    from ptcli.data.jsonl import read_jsonl
    from ptcli.tuning.validate import Task, evaluate

    model, tok = llama
    _, cfgs = mixed
    rows = [r for r in read_jsonl(cfgs["sent"].train, training=True, tag=("sent", "topic")) if r.tag == "sent"]
    enc = encode(tok, rows, P_TOKENS, 64, True)
    prompts = torch.randn(2, P_TOKENS, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5

    class One:
        process_index, num_processes, device = 0, 1, "cpu"

        def reduce(self, t, op):
            return t

    task = Task("sent", cfgs["sent"], enc, enc, closed_answers(rows), "", [0, 1])
    assert task.choices == ["negative", "positive"]
    got = evaluate(model, tok, prompts, task, 3, One())
    total, n = 0.0, 0
    for k in range(2):
        s, c = plain_lm_loss(model, prompts[k], enc.ids, enc.labels, tok.pad_token_id)
        total, n = total + float(s), n + c
    assert got["val_loss"] == pytest.approx(total / n, rel=1e-5)
