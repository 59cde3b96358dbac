"""Stacked prompts (ensembles, several tags in one batch), ranked answers and class-label init.

Each expectation comes from a plainer computation on the same tiny model: one prompt at a
time, one row at a time.
"""

from __future__ import annotations

import pytest
import torch
from reference import greedy, plain_lm_loss

from ptcli.data.encode import ANSWER_PREFIX, answer_tokens, closed_answers
from ptcli.data.jsonl import Record
from ptcli.errors import ModelError
from ptcli.lm.answers import run_rows
from ptcli.lm.forward import IGNORE, choice_scores, decode_or_score, lm_loss
from ptcli.lm.rules import ranked, vote
from ptcli.tuning.soft_prompt import init_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P = 4
TEXTS = ["i love it", "the food was terrible and i hated it", "sports news : the team won", "i"]
CHOICES = ["positive", "negative", "entailment"]  # "entailment" is several tokens


def _stack(model, k: int, seed: int = 0) -> torch.Tensor:
    H = model.get_input_embeddings().weight.shape[1]
    return torch.randn(k, P, H, generator=torch.Generator().manual_seed(seed)) * 0.5  # (K, P, H)


def predict(model, tok, prompts: torch.Tensor, texts, mode: str, choices=None, max_new: int = 0) -> list[str]:
    """One tag's answers by the rules of lm/answers.py: members vote (generate) or average their scores (rank)."""
    out = run_rows(model, tok, [prompts], texts, [0] * len(texts), max_new=max_new, choices=choices)
    if mode == "rank":
        assert out.scores is not None
        return [choices[ranked(s)] for s in out.scores]
    assert out.texts is not None
    return [t[vote(t)] for t in out.texts]


def _rows(tok) -> tuple[list[list[int]], list[list[int]]]:
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    answers = answer_tokens(tok, ["positive", "negative", "sports", "entailment"])
    return [t + a for t, a in zip(texts, answers)], [[IGNORE] * len(t) + a for t, a in zip(texts, answers)]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_stacked_loss_equals_one_prompt_per_row(base, fast: bool) -> None:
    model, tok = base
    prompts = _stack(model, 3)
    seqs, labels = _rows(tok)
    which = [2, 0, 2, 1]
    total, n = (lm_loss if fast else plain_lm_loss)(model, prompts, seqs, labels, tok.pad_token_id, which=which)
    parts = [plain_lm_loss(model, prompts[w], [s], [lab], tok.pad_token_id) for w, s, lab in zip(which, seqs, labels)]
    assert n == sum(c for _, c in parts)
    assert total.item() == pytest.approx(sum(s.item() for s, _ in parts), rel=1e-5)


def test_stacked_gradient_reaches_only_the_used_prompts(llama) -> None:
    model, tok = llama
    prompts = _stack(model, 3).requires_grad_()
    seqs, labels = _rows(tok)
    loss, _ = lm_loss(model, prompts, seqs, labels, tok.pad_token_id, which=[0, 2, 0, 2])
    loss.backward()
    norms = prompts.grad.flatten(1).norm(dim=1)  # (K,)
    assert norms[0] > 0 and norms[2] > 0 and norms[1] == 0


def test_stacked_greedy_equals_one_prompt_at_a_time(base) -> None:
    model, tok = base
    prompts = _stack(model, 2, seed=1)
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    which = [1, 0, 0, 1]
    together = greedy(model, prompts, texts, tok.pad_token_id, tok.eos_token_id, 4, which=which)
    alone = [greedy(model, prompts[w], [t], tok.pad_token_id, tok.eos_token_id, 4)[0] for w, t in zip(which, texts)]
    assert together == alone


def test_choice_scores_are_answer_log_likelihoods(base) -> None:
    model, tok = base
    prompts = _stack(model, 2, seed=2)
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    options = answer_tokens(tok, CHOICES)
    which = [0, 1, 1, 0]
    scores = choice_scores(model, prompts, texts, options, tok.pad_token_id, which)  # (B, C)
    assert scores.shape == (len(TEXTS), len(CHOICES))
    for i, (t, w) in enumerate(zip(texts, which)):
        for j, c in enumerate(options):
            nll, n = plain_lm_loss(model, prompts[w], [t + c], [[IGNORE] * len(t) + c], tok.pad_token_id)
            assert n == len(c)  # the answer's tokens and end-of-sequence, nothing of the text
            assert scores[i, j].item() == pytest.approx(-nll.item(), rel=1e-5, abs=1e-5)


def test_ranked_ensemble_averages_member_scores(llama) -> None:
    model, tok = llama
    prompts = _stack(model, 3, seed=3)
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    per_member = torch.stack(
        [choice_scores(model, prompts[k], texts, answer_tokens(tok, CHOICES), tok.pad_token_id) for k in range(3)]
    )
    expected = [CHOICES[j] for j in per_member.mean(0).argmax(-1).tolist()]
    assert predict(model, tok, prompts, texts, "rank", CHOICES) == expected
    assert predict(model, tok, prompts[1], texts, "rank", CHOICES) == [
        CHOICES[j] for j in per_member[1].argmax(-1).tolist()
    ]


def test_generated_ensemble_takes_the_majority(llama) -> None:
    model, tok = llama
    a, b = _stack(model, 2, seed=4)
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    alone_a = predict(model, tok, a, texts, "generate", max_new=3)
    alone_b = predict(model, tok, b, texts, "generate", max_new=3)
    assert alone_a != alone_b  # otherwise the vote below proves nothing
    assert predict(model, tok, torch.stack([b, a, a]), texts, "generate", max_new=3) == alone_a  # two of three
    assert (
        predict(model, tok, torch.stack([b, a]), texts, "generate", max_new=3) == alone_b
    )  # a tie goes to the first member


def test_labels_init_embeds_each_class_then_samples_vocabulary(llama) -> None:
    model, tok = llama
    table = model.get_input_embeddings().weight.detach().float()
    labels = ["negative", "positive"]
    got = init_prompt(model, tok, 5, "labels", None, seed=7, labels=labels)
    for i, label in enumerate(labels):
        ids = tok(ANSWER_PREFIX + label, add_special_tokens=False).input_ids
        assert torch.allclose(got[i], table[ids].mean(0))
    assert all(any(torch.equal(row, t) for t in table[:5000]) for row in got[2:])  # the rest: vocabulary rows
    other_seed = init_prompt(model, tok, 5, "labels", None, seed=8, labels=labels)
    assert torch.equal(got[:2], other_seed[:2]) and not torch.equal(got[2:], other_seed[2:])
    clipped = init_prompt(model, tok, 1, "labels", None, seed=7, labels=labels)
    assert torch.equal(clipped, got[:1])


def test_labels_init_needs_an_answer_set(llama) -> None:
    model, tok = llama
    with pytest.raises(ModelError, match="--init labels needs a closed answer set"):
        init_prompt(model, tok, 4, "labels", None, seed=0, labels=None)


def test_closed_answers_only_for_recurring_small_sets() -> None:
    def rows(answers):
        return [Record(i, "t", "x", a, {}) for i, a in enumerate(answers, start=1)]

    assert closed_answers(rows(["yes", "no", "yes ", "no"])) == ["no", "yes"]
    assert closed_answers(rows(["a", "b", "c"])) is None  # every answer once: free text
    assert closed_answers(rows([str(i % 40) for i in range(400)])) is None  # too many classes to rank


def test_one_pass_decodes_and_scores_like_two(base) -> None:
    model, tok = base
    prompts = _stack(model, 2, seed=5)
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    options = answer_tokens(tok, CHOICES)
    which = [0, 1, 0, 1]
    outs, scores, _ = decode_or_score(
        model, prompts, texts, tok.pad_token_id, tok.eos_token_id, which=which, max_new=3, choices=options
    )
    assert outs == greedy(model, prompts, texts, tok.pad_token_id, tok.eos_token_id, 3, which=which)
    assert torch.allclose(scores, choice_scores(model, prompts, texts, options, tok.pad_token_id, which), atol=1e-5)
