"""Templates: parsing, row layout, and the placed fast path held to a plain reference.

The reference lays one row out by hand (token embeddings, prompt vectors in their slots),
runs the model's own forward on it unpadded, with full logits and no cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import greedy
from test_model import ROWS

from ptcli.data.encode import answer_tokens, encode
from ptcli.data.jsonl import Record
from ptcli.data.template import Layout, parse
from ptcli.errors import UsageError
from ptcli.lm.forward import IGNORE, choice_scores, lm_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P = 6
TEMPLATES = [
    "suffix",
    "{text} so:{prompt}{answer}",
    "{prompt:2}{text}{prompt}{answer}",
    "Q:{prompt:1} {text}{prompt}{answer}",
]


def _prompt(model, seed: int = 0) -> torch.Tensor:
    H = model.get_input_embeddings().weight.shape[1]
    return torch.randn(P, H, generator=torch.Generator().manual_seed(seed)) * 0.5  # (P, H)


def _row_logits(model, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Full logits (T, V) of one unpadded row whose prompt vector j is written -(j+1)."""
    E = model.get_input_embeddings()(
        torch.tensor([max(t, 0) for t in ids])
    )  # (T, H), as the model embeds its own tokens
    embeds = torch.stack([prompt[-t - 1] if t < 0 else e for t, e in zip(ids, E)])[None]  # (1, T, H)
    return model(inputs_embeds=embeds).logits[0]  # (T, V)


def _encoded(tok, template: str, answer_only: bool = True):
    records = [Record(i, "t", text, answer, {}) for i, (text, answer) in enumerate(ROWS, start=1)]
    return encode(tok, records, P, 512, answer_only, template=template)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{text}{answer}", "at least one {prompt}"),
        ("{prompt}{text}", "{answer} exactly once"),
        ("{prompt}{answer}{text}", "{answer} must come last"),
        ("{prompt:4}{text}{prompt:4}{answer}", "hold 8 vectors"),
        ("{prompt}{text}{prompt}{answer}", "at most one bare"),
        ("{prompt}{txt}{answer}", "'{txt}' is not a placeholder"),
        ("{prompt:0}{text}{answer}", "'{prompt:0}' is not a placeholder"),
        ("{prompt:6}{text}{prompt}{answer}", "leaving none"),
    ],
)
def test_bad_templates_name_the_problem(template: str, problem: str) -> None:
    with pytest.raises(UsageError, match="--template") as info:
        parse(template, P)
    assert problem in info.value.message


def test_layout_places_slots_in_order(llama) -> None:
    _, tok = llama
    layout = Layout(tok, "{prompt:2}{text} so:{prompt}{answer}", P)
    anchor = tok(" so:", add_special_tokens=False).input_ids
    ids, labels, context = layout.row([11, 12], [21, 22], answer_only=True)
    assert ids == [-1, -2, 11, 12, *anchor, -3, -4, -5, -6, 21, 22]
    assert context == ids[:-2]
    assert labels == [IGNORE] * (len(ids) - 2) + [21, 22]
    _, full, _ = layout.row([11, 12], [21, 22], answer_only=False)
    assert full == [IGNORE, IGNORE, 11, 12, *anchor, IGNORE, IGNORE, IGNORE, IGNORE, 21, 22]
    # text before any prompt vector takes no loss: no prompt can change it
    assert Layout(tok, "suffix", P).row([11, 12], [21], answer_only=False)[1] == [IGNORE] * (2 + P) + [21]


def test_prefix_template_keeps_the_plain_layout(llama) -> None:
    _, tok = llama
    assert _encoded(tok, "prefix").ids == _encoded(tok, "{prompt}{text}{answer}").ids
    assert all(t >= 0 for ids in _encoded(tok, "prefix").ids for t in ids)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("answer_only", [True, False], ids=["answer-only", "full-text"])
def test_loss_and_gradient_equal_unpadded_rows(base, template: str, answer_only: bool) -> None:
    model, tok = base
    enc = _encoded(tok, template, answer_only)
    assert len({len(ids) for ids in enc.ids}) == len(ROWS)  # padding is exercised
    ref = _prompt(model).requires_grad_(True)
    expected = torch.tensor(0.0)
    for ids, labels in zip(enc.ids, enc.labels):
        logits = _row_logits(model, ref, ids)[:-1]  # position t predicts token t+1
        targets = torch.tensor(labels[1:])
        keep = targets != IGNORE
        expected = expected + F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    expected.backward()
    got_prompt = _prompt(model).requires_grad_(True)
    got, n = lm_loss(model, got_prompt, enc.ids, enc.labels, tok.pad_token_id)
    got.backward()
    assert n == sum(lab != IGNORE for labels in enc.labels for lab in labels[1:])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_prompt.grad, ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("template", TEMPLATES)
def test_greedy_and_ranked_answers_equal_unpadded_rows(base, template: str) -> None:
    model, tok = base
    prompt = _prompt(model, seed=2)
    layout = Layout(tok, template, P)
    seqs = [layout.context(tok(t, add_special_tokens=False).input_ids) for t, _ in ROWS]
    expected = []
    with torch.no_grad():
        for seq in seqs:
            out: list[int] = []
            for _ in range(5):
                nxt = int(_row_logits(model, prompt, seq + out)[-1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
            expected.append(out)
        got = greedy(model, prompt, seqs, tok.pad_token_id, tok.eos_token_id, 5)
        choices = answer_tokens(tok, ["positive", "negative", "entailment"])
        scores = choice_scores(model, prompt, seqs, choices, tok.pad_token_id)  # (B, C)
        for i, seq in enumerate(seqs):
            for j, c in enumerate(choices):
                logp = _row_logits(model, prompt, seq + c).log_softmax(-1)[len(seq) - 1 : -1]  # (len(c), V)
                torch.testing.assert_close(
                    scores[i, j], logp[torch.arange(len(c)), torch.tensor(c)].sum(), rtol=1e-4, atol=1e-4
                )
    assert got == expected


def test_a_typed_backslash_n_is_a_newline(llama) -> None:
    _, tok = llama
    typed = Layout(tok, r"{text}\nAnswer:{prompt}{answer}", P)  # as a shell passes '{text}\nAnswer:...'
    real = Layout(tok, "{text}\nAnswer:{prompt}{answer}", P)
    assert typed.row([11], [21], True) == real.row([11], [21], True)
    assert tok("\nAnswer:", add_special_tokens=False).input_ids[0] in typed.row([11], [21], True)[0]


def test_overhead_counts_a_literal_used_twice(llama) -> None:
    """Every position a row takes besides text and answer counts, a repeated literal each time it stands."""
    _, tok = llama
    template = "{prompt:2} A: {text} A: {prompt}{answer}"
    layout = Layout(tok, template, P)
    text, answer = tok("good movie", add_special_tokens=False).input_ids, answer_tokens(tok, ["positive"])[0]
    ids, _, _ = layout.row(text, answer, answer_only=True)
    assert len(ids) == layout.overhead() + len(text) + len(answer)
    budget = P + 2 * len(tok(" A: ", add_special_tokens=False).input_ids) + len(text) + len(answer)
    rows = [Record(1, "t", "good movie", "positive", {})]
    enc = encode(tok, rows, P, budget, answer_only=True, template=template)
    assert enc.truncated == 0 and max(len(r) for r in enc.ids) <= budget  # the row fits exactly: nothing is cut
    enc = encode(tok, rows, P, budget - 1, answer_only=True, template=template)
    assert enc.truncated == 1 and max(len(r) for r in enc.ids) <= budget - 1  # one position less: the text gives one
