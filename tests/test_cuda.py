"""The paths that matter, on a CUDA device: fast paths equal to the plain path, bfloat16, a tune and an infer.

Skipped without CUDA; `scripts/gpu_check.sh` runs them on a GPU machine. PTCLI_TEST_DEVICE=cpu
runs the same checks on the CPU (how they were written and kept working on a machine without a GPU).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from clihelp import cli, ok
from reference import greedy, plain_lm_loss

from ptcli.data.encode import answer_tokens
from ptcli.lm.forward import IGNORE, choice_scores, lm_loss
from ptcli.project import bank
from ptcli.project import manifest as proj

DEVICE = os.environ.get("PTCLI_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
]
P = 4
TEXTS = ["i love it", "the food was terrible and i hated it", "sports news : the team won", "i"]


@pytest.fixture(params=["llama", "gpt2"])
def pair(request):
    """(model on CPU, the same model on DEVICE, tokenizer) for each tiny architecture."""
    model, tok = request.getfixturevalue(request.param)
    return model, copy.deepcopy(model).to(DEVICE), tok


def _batch(model, tok, k: int = 3):
    H = model.get_input_embeddings().weight.shape[1]
    prompts = torch.randn(k, P, H, generator=torch.Generator().manual_seed(0)) * 0.5  # (K, P, H)
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    answers = answer_tokens(tok, ["positive", "negative", "sports", "entailment"])
    return (
        prompts,
        [t + a for t, a in zip(texts, answers)],
        [[IGNORE] * len(t) + a for t, a in zip(texts, answers)],
        texts,
    )


def test_fast_loss_and_gradient_equal_the_plain_path(pair) -> None:
    _, model, tok = pair
    prompts, seqs, labels, _ = _batch(model, tok)
    grads = []
    for fast in (True, False):
        x = prompts.to(DEVICE).requires_grad_()
        total, n = (lm_loss if fast else plain_lm_loss)(model, x, seqs, labels, tok.pad_token_id, which=[2, 0, 2, 1])
        (total / n).backward()
        grads.append((total.item(), x.grad.cpu()))
    (fast_loss, fast_grad), (plain_loss, plain_grad) = grads
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert torch.allclose(fast_grad, plain_grad, atol=1e-5, rtol=1e-4)


def test_answers_on_the_device_equal_the_cpu(pair) -> None:
    cpu, model, tok = pair
    prompts, _, _, texts = _batch(model, tok, k=1)
    assert greedy(model, prompts[0].to(DEVICE), texts, tok.pad_token_id, tok.eos_token_id, 5) == greedy(
        cpu, prompts[0], texts, tok.pad_token_id, tok.eos_token_id, 5
    )
    choices = answer_tokens(tok, ["positive", "negative", "entailment"])
    on_device = choice_scores(model, prompts[0].to(DEVICE), texts, choices, tok.pad_token_id).cpu()
    assert torch.allclose(on_device, choice_scores(cpu, prompts[0], texts, choices, tok.pad_token_id), atol=1e-4)


def test_bfloat16_base_keeps_a_float32_prompt_and_close_losses(pair) -> None:
    _, model, tok = pair
    half = copy.deepcopy(model).to(torch.bfloat16)
    prompts, seqs, labels, _ = _batch(model, tok)
    x = prompts.to(DEVICE).requires_grad_()
    fast, n = lm_loss(half, x, seqs, labels, tok.pad_token_id, which=[2, 0, 2, 1])
    plain, _ = plain_lm_loss(half, prompts.to(DEVICE), seqs, labels, tok.pad_token_id, which=[2, 0, 2, 1])
    full, _ = lm_loss(model, prompts.to(DEVICE), seqs, labels, tok.pad_token_id, which=[2, 0, 2, 1])
    (fast / n).backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert fast.item() == pytest.approx(plain.item(), rel=2e-2)
    assert fast.item() == pytest.approx(full.item(), rel=5e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tune_and_infer_run_on_the_device(
    lively_llama, tiny_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    if DEVICE == "cpu":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    root = tmp_path / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", P, "-q"))
    ok(
        cli(
            "tune",
            "--tag",
            "sent",
            "-p",
            root,
            "--train",
            tiny_data.train,
            "--valid",
            tiny_data.valid,
            "--max-steps",
            6,
            "--val-check-interval",
            3,
            "--dtype",
            dtype,
            "-q",
        )
    )
    prompt, meta = bank.get(proj.load(root), "sent")
    assert prompt.dtype == torch.float32 and torch.isfinite(prompt).all() and meta.steps == 6
    result = cli("infer", tiny_data.valid, "-p", root, "--dtype", dtype, "--json", "--tokens-to-generate", 3)
    ok(result)
    assert len(json.loads(result.stdout)["predictions"]) == 10
