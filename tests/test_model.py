"""The soft-prompt layout, the loss, greedy decoding, prompt init and the base fingerprint.

Every expectation is derived from a second, plainer computation on the same tiny model:
one unpadded row at a time, full logits, no KV cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import assemble, greedy, plain_lm_loss

from ptcli.config import BaseOptions
from ptcli.data.encode import encode
from ptcli.data.jsonl import Record
from ptcli.enums import Dtype
from ptcli.errors import ModelError
from ptcli.lm.base import fingerprint, load_base
from ptcli.lm.forward import IGNORE, lm_loss
from ptcli.tuning.soft_prompt import SoftPrompt, init_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P = 4


def _prompt(model, seed: int = 0) -> torch.Tensor:
    H = model.get_input_embeddings().weight.shape[1]
    return torch.randn(P, H, generator=torch.Generator().manual_seed(seed)) * 0.5  # (P, H)


ROWS = [
    ("i love it", "positive"),
    ("the food was terrible and i hated it , a negative review", "negative"),
    ("sports news : the team won", "sports"),
    ("is it true ?", "entailment"),  # a multi-token answer
    ("i", "True"),
]


def _encoded(tok, answer_only: bool):
    records = [Record(i, "t", text, answer, {}) for i, (text, answer) in enumerate(ROWS, start=1)]
    enc = encode(tok, records, P, 512, answer_only)
    assert len({len(ids) for ids in enc.ids}) == len(ROWS)  # all different lengths: padding is exercised
    return enc


def _row_logits(model, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Full logits (P+T, V) for one unpadded row behind the prompt, straight from the model's own forward."""
    E = model.get_input_embeddings().weight  # (V, H)
    embeds = torch.cat([prompt, E[torch.tensor(ids, dtype=torch.long)]])[None]  # (1, P+T, H)
    with torch.no_grad():
        return model(inputs_embeds=embeds).logits[0]  # (P+T, V)


def test_load_base_freezes_and_sets_pad(llama) -> None:
    model, tok = llama
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tok.pad_token_id == tok.eos_token_id  # the fixture's tokenizer has no pad token


def test_assemble_layout(llama) -> None:
    model, tok = llama
    prompt = _prompt(model)
    seqs = [[5, 6, 7], [8], [9, 10, 11, 12, 13], []]
    pad = tok.pad_token_id
    embeds, mask, pos = assemble(model, prompt, seqs, pad)
    E = model.get_input_embeddings().weight
    S = P + 5
    assert embeds.shape == (4, S, E.shape[1]) and mask.shape == (4, S) and pos.shape == (4, S)
    for i, seq in enumerate(seqs):
        start = S - P - len(seq)  # first non-pad position
        assert mask[i].tolist() == [0] * start + [1] * (P + len(seq))
        assert pos[i, start:].tolist() == list(range(P + len(seq)))
        for j in range(P):
            assert torch.equal(embeds[i, start + j], prompt[j])
        for k, t in enumerate(seq):
            assert torch.equal(embeds[i, start + P + k], E[t])


def test_assemble_keeps_prompt_gradient(llama) -> None:
    model, tok = llama
    sp = SoftPrompt(_prompt(model))
    embeds, _, _ = assemble(model, sp(), [[5, 6], [7]], tok.pad_token_id)
    embeds.sum().backward()
    # each prompt vector appears once per row: d(sum)/d(prompt) = number of rows
    assert torch.equal(sp.weight.grad, torch.full_like(sp.weight, 2.0))


@pytest.mark.parametrize("answer_only", [True, False], ids=["answer-only", "full-text"])
def test_lm_loss_fast_equals_plain(base, answer_only: bool) -> None:
    model, tok = base
    enc = _encoded(tok, answer_only)
    prompt = _prompt(model)
    with torch.no_grad():
        fast, n_fast = lm_loss(model, prompt, enc.ids, enc.labels, tok.pad_token_id)
        plain, n_plain = plain_lm_loss(model, prompt, enc.ids, enc.labels, tok.pad_token_id)
    assert n_fast == n_plain
    assert abs(float(fast) - float(plain)) / n_plain <= 1e-5  # per labelled token
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-5)  # and the sum itself, to float32 rounding


@pytest.mark.parametrize("answer_only", [True, False], ids=["answer-only", "full-text"])
def test_lm_loss_matches_unpadded_rows(base, answer_only: bool) -> None:
    """The batched, left-padded loss is the sum of each row's own cross entropy."""
    model, tok = base
    enc = _encoded(tok, answer_only)
    prompt = _prompt(model, seed=1)
    expected_sum, expected_n = torch.tensor(0.0), 0
    for ids, labels in zip(enc.ids, enc.labels):
        # token t is predicted one position earlier: the last prompt slot predicts the first token
        preds = _row_logits(model, prompt, ids)[P - 1 : -1]  # (T, V)
        keep = torch.tensor([lab != IGNORE for lab in labels])
        expected_sum += F.cross_entropy(preds[keep], torch.tensor(labels)[keep], reduction="sum")
        expected_n += int(keep.sum())
    with torch.no_grad():
        got, n = lm_loss(model, prompt, enc.ids, enc.labels, tok.pad_token_id)
    assert n == expected_n == sum(lab != IGNORE for labels in enc.labels for lab in labels)
    torch.testing.assert_close(got, expected_sum, rtol=1e-4, atol=1e-4)


def test_gradient_flows_only_to_the_prompt(base) -> None:
    model, tok = base
    enc = _encoded(tok, True)
    sp = SoftPrompt(_prompt(model))
    loss, n = lm_loss(model, sp(), enc.ids, enc.labels, tok.pad_token_id)
    (loss / n).backward()
    assert sp.weight.grad is not None and sp.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def _manual_greedy(model, prompt, seq: list[int], eos: int, max_new: int) -> list[int]:
    """Argmax one token at a time, recomputing the full forward of the unpadded row each step."""
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(_row_logits(model, prompt, seq + out)[-1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return out


def test_greedy_matches_manual_argmax(base) -> None:
    model, tok = base
    prompt = _prompt(model, seed=2)
    seqs = [tok(t, add_special_tokens=False).input_ids for t, _ in ROWS]
    max_new = 6
    expected = [_manual_greedy(model, prompt, s, tok.eos_token_id, max_new) for s in seqs]
    assert greedy(model, prompt, seqs, tok.pad_token_id, tok.eos_token_id, max_new) == expected
    assert len({tuple(e) for e in expected}) == len(seqs)  # the model is not just echoing a token
    # stop at end of sequence: declare the third token of row 0 to be eos; each row stops before it
    stop = expected[0][2]
    cut = [e[: e.index(stop)] if stop in e else e for e in expected]
    assert greedy(model, prompt, seqs, tok.pad_token_id, stop, max_new) == cut
    assert cut[0] == expected[0][: expected[0].index(stop)] and len(cut[0]) <= 2


# ---------------------------------------------------------------- init_prompt


@pytest.mark.parametrize(
    ("text", "n"), [("positive negative", 5), ("positive negative", 1), ("the movie was great and i loved it", 3)]
)
def test_text_init_tiles_or_clips(llama, text: str, n: int) -> None:
    model, tok = llama
    ids = tok(text, add_special_tokens=False).input_ids
    expected_ids = [ids[i % len(ids)] for i in range(n)]
    E = model.get_input_embeddings().weight
    got = init_prompt(model, tok, n, "text", text, seed=0)
    assert got.dtype == torch.float32 and got.shape == (n, E.shape[1])
    assert torch.equal(got, E[torch.tensor(expected_ids)])


def test_text_init_needs_tokens(llama) -> None:
    model, tok = llama
    with pytest.raises(ModelError, match="produced no tokens"):
        init_prompt(model, tok, P, "text", "", seed=0)


def test_random_init_shape_and_seed(llama) -> None:
    model, tok = llama
    a = init_prompt(model, tok, P, "random", None, seed=1)
    assert a.shape == (P, model.get_input_embeddings().weight.shape[1]) and a.dtype == torch.float32
    assert torch.equal(a, init_prompt(model, tok, P, "random", None, seed=1))
    assert not torch.equal(a, init_prompt(model, tok, P, "random", None, seed=2))
    # the draws follow the vocabulary's per-dimension statistics
    table = model.get_input_embeddings().weight
    many = init_prompt(model, tok, 4000, "random", None, seed=3)
    torch.testing.assert_close(many.mean(0), table.mean(0), atol=0.1 * table.std(0).max().item(), rtol=0)
    torch.testing.assert_close(many.std(0), table.std(0), rtol=0.1, atol=0)


def test_vocab_init_picks_embedding_rows(llama) -> None:
    model, tok = llama
    E = model.get_input_embeddings().weight
    got = init_prompt(model, tok, 8, "vocab", None, seed=5)
    for row in got:
        assert (E == row).all(dim=1).any()
    assert torch.equal(got, init_prompt(model, tok, 8, "vocab", None, seed=5))
    assert not torch.equal(got, init_prompt(model, tok, 8, "vocab", None, seed=6))


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_stable_across_loads(lively_llama, llama) -> None:
    again, _ = load_base(str(lively_llama))
    assert fingerprint(again) == fingerprint(llama[0])
    assert len(fingerprint(again)) == 64


def test_fingerprint_same_in_bfloat16(lively_llama, lively_gpt2, llama, gpt2) -> None:
    for path, (model, _) in ((lively_llama, llama), (lively_gpt2, gpt2)):
        half, _ = load_base(str(path), BaseOptions(dtype=Dtype.BFLOAT16))
        assert half.get_input_embeddings().weight.dtype == torch.bfloat16
        assert fingerprint(half) == fingerprint(model)


def test_fingerprint_differs_between_models(llama, gpt2) -> None:
    assert fingerprint(llama[0]) != fingerprint(gpt2[0])


def test_fingerprint_changes_when_a_weight_changes(lively_llama, llama) -> None:
    model, _ = load_base(str(lively_llama))
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1.0
    assert fingerprint(model) != fingerprint(llama[0])


def test_fingerprint_changes_when_a_middle_weight_changes(lively_llama, llama) -> None:
    model, _ = load_base(str(lively_llama))
    E = model.get_input_embeddings().weight  # (V, H): V*H values, far more than 512
    with torch.no_grad():
        E[E.shape[0] // 2, 0] += 1.0
    assert fingerprint(model) != fingerprint(llama[0])
