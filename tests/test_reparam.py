"""Reparameterized prompts and templates through a real run: encoders, resume, the bank record, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from clihelp import cli, failed, ok
from reference import tune
from test_train import ROWS, Reporter, small_run

from ptcli.config import TaskConfig
from ptcli.project import bank, runs
from ptcli.project import manifest as proj
from ptcli.tuning.soft_prompt import SoftPrompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_residual_starts_at_the_initial_prompt_and_every_encoder_trains() -> None:
    init = torch.randn(3, 5, 16)  # (S, P, H)
    assert torch.equal(SoftPrompt(init, "residual")(), init)
    for kind in ("residual", "mlp", "lstm"):
        sp = SoftPrompt(init, kind, inner=8)
        out = sp()
        assert out.shape == init.shape
        out.pow(2).sum().backward()
        assert all(p.grad is not None for p in sp.parameters())
        assert len(sp.encoders) == 3  # one encoder per slot: tags and members stay independent


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> tuple[Path, TaskConfig]:
    return small_run(
        tmp_path_factory.mktemp("reparam") / "p",
        lively_llama,
        ROWS,
        template="{text} so{prompt}{answer}",
        reparam="residual",
        reparam_lr=0.01,
    )


def test_resume_with_an_encoder_and_a_template_reaches_the_uninterrupted_prompt(start, tmp_path: Path) -> None:
    src, cfg = start
    full = proj.load(Path(shutil.copytree(src, tmp_path / "full")))
    tune(full, "sent", cfg, Reporter())
    full_prompt, meta = bank.get(full, "sent")
    assert meta.best_step > 0 and meta.config["reparam"] == "residual"

    p = proj.load(Path(shutil.copytree(src, tmp_path / "cut")))
    with pytest.raises(KeyboardInterrupt):
        tune(p, "sent", cfg, Reporter(stop_at=5))
    from safetensors import safe_open

    with safe_open(str(runs.checkpoint_path(p, "sent")), framework="pt") as f:
        assert any(k.startswith("exp_avg.encoders.0.") for k in f.keys())  # the encoder's optimizer state rides along
    tune(proj.load(p.root), "sent", cfg, Reporter(), resume=True)
    prompt, _ = bank.get(proj.load(p.root), "sent")
    assert prompt.shape == full_prompt.shape == (4, full_prompt.shape[-1])  # the bank holds the encoder's output only
    assert torch.allclose(prompt, full_prompt, atol=1e-6, rtol=0)


def test_cli_records_the_template_and_infers_with_it(tmp_path: Path, tiny_llama: Path, tiny_data) -> None:
    root = tmp_path / "p"
    ok(cli("init", root, "--base", tiny_llama, "--num-prompt-tokens", 4))
    ok(
        cli(
            "tune",
            "-p",
            root,
            "--tag",
            "sent",
            "--train",
            tiny_data.train,
            "--valid",
            tiny_data.valid,
            "--max-steps",
            2,
            "--template",
            "{text} Answer:{prompt}{answer}",
            "--reparam",
            "mlp",
            "-q",
        )
    )
    shown = json.loads(cli("show", "-p", root, "sent", "--json").stdout)["record"]
    assert shown["config"]["template"] == "{text} Answer:{prompt}{answer}" and shown["config"]["reparam"] == "mlp"
    result = cli("infer", "-p", root, tiny_data.valid, "--mode", "rank")
    ok(result)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and all(r["prediction"] in shown["choices"] for r in rows)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{text}{answer}", "needs at least one {prompt} slot"),
        ("{prompt:3}{text}{answer}", "the slots hold 3 vectors but the project's prompt length is 4"),
    ],
)
def test_cli_refuses_a_bad_template_with_exit_2(
    tmp_path: Path, tiny_llama: Path, tiny_data, template: str, problem: str
) -> None:
    root = tmp_path / "p"
    ok(cli("init", root, "--base", tiny_llama, "--num-prompt-tokens", 4))
    for command in (["add-task", "sent"], ["tune", "--tag", "sent"]):
        err = failed(
            cli(*command, "-p", root, "--train", tiny_data.train, "--valid", tiny_data.valid, "--template", template), 2
        )
        assert "--template" in err and problem in err
    assert bank.tags(proj.load(root)) == [] and not proj.load(root).tasks


def test_peft_export_refuses_a_template_it_cannot_express(tmp_path: Path, tiny_llama: Path, tiny_data) -> None:
    root = tmp_path / "p"
    ok(cli("init", root, "--base", tiny_llama, "--num-prompt-tokens", 4))
    ok(
        cli(
            "tune",
            "-p",
            root,
            "--tag",
            "sent",
            "--train",
            tiny_data.train,
            "--valid",
            tiny_data.valid,
            "--max-steps",
            1,
            "--template",
            "suffix",
            "-q",
        )
    )
    err = failed(cli("export", "-p", root, "sent", tmp_path / "adapter", "--format", "peft"), 2)
    assert "template 'suffix'" in err and "only prepends" in err and not (tmp_path / "adapter").exists()
    ok(cli("export", "-p", root, "sent", tmp_path / "sent.safetensors"))  # the ptcli format carries the template
