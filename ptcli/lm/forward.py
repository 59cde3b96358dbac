"""Running the frozen base behind soft prompts: training loss, greedy answers, ranked choices.

Every function takes a stack of prompts (K, P, H) and `which` (B,), the prompt each row
uses: one tag's prompt (K=1), the members of an ensemble, or the prompts of several tags in
one mixed batch. A single prompt (P, H) is the same as K=1.

The fast path (`prefixed`) runs each prompt once per batch and shares its key/value cache
with the rows that use it: in a causal LM a prompt's activations do not depend on what
follows. Layout per row: [prompt (P)][pad ...][tokens], pads masked out, token positions
continuing from P. Under a sliding window, pads inside a row count against it (arch.py), so
the loss pads rows on the right instead ([prompt][tokens][pad ...]; nothing is appended to
them), and `read`, for rows that decoding or candidates extend, moves a right-padded batch's
pads in front of the prompt (`pads_first`) whenever a padded row could cross the window.
The plain layout that runs every row in full, which tests hold these paths to, is in tests/reference.py.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ptcli.lm.arch import shared_prefix_exact
from ptcli.lm.batch import IGNORE, Read, cache_of, left_pad, right_pad, stack, to_logits, with_cache
from ptcli.lm.depth import forward_with, prompt_depth
from ptcli.lm.placed import has_slots, placed_hidden, placed_read
from ptcli.lm.rules import Step


def read(model, prompts: torch.Tensor, seqs: list[list[int]], pad_id: int, which=None, extra: int = 0) -> Read:
    """Read rows that will be extended (decoding, candidates), sharing each prompt's cache, exactly under any window.

    extra: tokens that will be appended afterwards; they count toward the width that a
    sliding window must cover (arch.shared_prefix_exact). Rows that could cross the window
    are read padded on the right, then their pads are moved in front of the prompt.
    """
    width = prompts.shape[-2] + max(len(s) for s in seqs) + extra
    if shared_prefix_exact(model, width):
        return prefixed(model, prompts, seqs, pad_id, which)
    from transformers import DynamicCache

    whole = DynamicCache()  # keeps every slot: the model's own cache would drop those a window has passed
    return pads_first(prefixed(model, prompts, seqs, pad_id, which, right=True, cache=whole))


def prefixed(
    model, prompts: torch.Tensor, seqs: list[list[int]], pad_id: int, which=None, right: bool = False, cache=None
) -> Read:
    """Run each prompt once and share its cache with the rows that use it: the fast path.

    Layout [prompt][pad ...][tokens], or with `right` [prompt][tokens][pad ...]: no pad
    inside a row, so exact under any window, but nothing can be appended to the rows (their
    hidden states are then aligned with right_pad(seqs)) until `pads_first`. Gradients reach
    the prompts through the cache. cache: an empty cache to fill, else the model's own.
    """
    prompts, which = stack(prompts, len(seqs), which)
    K, P = prompts.shape[0], prompts.shape[1] // prompt_depth(model)  # a deep prompt holds P vectors a block
    B = len(seqs)
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    which = which.to(device)
    vectors = prompts.to(device=device, dtype=dtype)  # (K, D*P, H)
    head = forward_with(
        model,
        vectors[:, :P],
        torch.arange(P, device=device).expand(K, P),  # every position of the head is a prompt slot
        vectors,
        position_ids=torch.arange(P, device=device).expand(K, P),
        use_cache=True,
        **with_cache(model, cache),
    )
    cache = cache_of(head)
    if K == 1:
        cache.batch_repeat_interleave(B)  # (1, ...) -> (B, ...)
    else:
        cache.batch_select_indices(which)  # (K, ...) -> (B, ...)
    pad = right_pad if right else left_pad
    ids = pad(seqs, pad_id).to(device)  # (B, T)
    tok_mask = pad([[1] * len(s) for s in seqs], 0, ids.shape[1]).to(device)  # (B, T)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long, device=device), tok_mask], dim=1)  # (B, P+T)
    pos = P + (tok_mask.cumsum(1) - 1).clamp(min=0)  # (B, T); a right pad repeats its row's last position
    out = model.base_model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **with_cache(model, cache)
    )
    return Read(out.last_hidden_state, head.last_hidden_state[:, -1][which], tok_mask, mask, pos[:, -1:], cache_of(out))


def pads_first(r: Read) -> Read:
    """[prompt][tokens][pad ...] -> [pad ...][prompt][tokens], cache and all, so the rows can be extended.

    Keys and values already carry their positions (rotary or learned), so only their slots
    move; every row's real slots stay contiguous, which a sliding window needs. The cache
    must hold every slot (see `read`).
    """
    S, T = r.mask.shape[1], r.tok_mask.shape[1]
    pads = (T - r.tok_mask.sum(1)).unsqueeze(1)  # (B, 1)
    src = (torch.arange(S, device=r.mask.device) - pads) % S  # (B, S): the slot each slot is taken from
    tok_src = (torch.arange(T, device=r.mask.device) - pads) % T  # (B, T): the same move over the tokens alone
    for layer in r.cache.layers:
        at = src.to(layer.keys.device)[
            :, None, :, None
        ]  # (B, 1, S, 1); layers may sit on several devices (--device-map)
        layer.keys, layer.values = (
            t.gather(2, at.expand(-1, t.shape[1], -1, t.shape[3])) for t in (layer.keys, layer.values)
        )  # (B, heads, S, d)
    hidden = r.hidden.gather(1, tok_src.unsqueeze(-1).expand_as(r.hidden))  # (B, T, H), aligned with left_pad(seqs)
    return Read(hidden, r.prompt_end, r.tok_mask.gather(1, tok_src), r.mask.gather(1, src), r.pos, r.cache)


def labelled_hidden(
    model, prompts: torch.Tensor, seqs: list[list[int]], labels: list[list[int]], pad_id: int, which=None
):
    """The final hidden state that predicts each labelled token, the token, and its row: (N, H), (N,), (N,).

    labels[i] is aligned with seqs[i] (IGNORE where nothing is scored); rows come in order and,
    within a row, its labelled positions in order (a row's first token, predicted by the
    prompt's end, last). Rows are padded on the right, behind the shared prompt: nothing is
    appended to them, so no pad sits inside a row and the fast path is exact under any window.
    """
    if has_slots(seqs):
        return placed_hidden(model, prompts, seqs, labels, pad_id, which)
    r = prefixed(model, prompts, seqs, pad_id, which, right=True)
    hidden = r.hidden  # (B, T, H)
    lab = right_pad(labels, IGNORE).to(hidden.device)  # (B, T)
    targets = lab[:, 1:]  # (B, T-1): token t predicts token t+1
    sel = (targets != IGNORE) & r.tok_mask[:, :-1].bool()  # a pad predicts nothing
    firsts = torch.tensor([row[0] for row in labels], device=hidden.device)  # (B,): predicted by the prompt's end
    first_sel = firsts != IGNORE
    h = torch.cat([hidden[:, :-1][sel], r.prompt_end[first_sel]])  # (N, H)
    t = torch.cat([targets[sel], firsts[first_sel]])  # (N,)
    rows = torch.arange(len(seqs), device=hidden.device)
    row_of = torch.cat([rows.unsqueeze(1).expand_as(sel)[sel], rows[first_sel]])  # (N,)
    return h, t, row_of


def token_logprobs(
    model, prompts: torch.Tensor, seqs: list[list[int]], labels: list[list[int]], pad_id: int, which=None
):
    """Log-probability of every labelled token, and the row it belongs to: (N,), (N,).

    The vocabulary projection runs only at the positions that predict a labelled token (`labelled_hidden`).
    """
    h, t, row_of = labelled_hidden(model, prompts, seqs, labels, pad_id, which)
    logp = -F.cross_entropy(to_logits(model, h).float(), t, reduction="none")  # (N,)
    return logp, row_of


def lm_loss(model, prompts: torch.Tensor, seqs: list[list[int]], labels: list[list[int]], pad_id: int, which=None):
    """Summed cross entropy over labelled tokens, and their count (tests/reference.py holds it to a plain forward)."""
    logp, _ = token_logprobs(model, prompts, seqs, labels, pad_id, which)
    return -logp.sum(), int(logp.numel())


@torch.no_grad()  # not inference_mode: its tensors would poison a sharded base's gathered weights for training
def decode_or_score(
    model,
    prompts: torch.Tensor,
    seqs: list[list[int]],
    pad_id: int,
    eos_id: int,
    *,
    which=None,
    max_new: int = 0,
    choices: list[list[int]] | None = None,
    agree=None,
    top: int | None = None,
    pick=None,
) -> tuple[list[list[int]] | None, torch.Tensor | None, list[list[Step]] | None]:
    """Read each row once, then decode greedily from it, score candidate answers after it, or both.

    Returns (greedy tokens per row, stopping at eos, not included) when max_new > 0, (B, C)
    summed log-likelihoods of the candidates when choices are given, and, when `top` is given
    with max_new, each greedy token's log-probability and the `top` likeliest at its step; `pick(logits)`
    (B, V) -> (B,) chooses each next token in place of the argmax (a sampling teacher). Candidates are
    token lists as training saw them (answer prefix and end-of-sequence included) and run
    as a short continuation of each row's cache, so ranking C answers costs one pass over
    the texts, not C. `agree(flag)` makes the stop decision common to all processes (a
    sharded base needs every process to make the same calls).
    """
    extra = max(max_new, max(map(len, choices or [[]]))) - 1  # tokens fed after the texts: decoded, or candidates' own
    r = (
        placed_read(model, prompts, seqs, pad_id, which, train=False)
        if has_slots(seqs)
        else read(model, prompts, seqs, pad_id, which, max(extra, 0))
    )
    last = r.hidden[:, -1]  # (B, H): predicts each row's next token
    scores = None
    if choices:
        scores = _score_choices(
            model, copy.deepcopy(r.cache) if max_new else r.cache, last, r.mask, r.pos, choices, pad_id
        )
    if not max_new:
        return None, scores, None
    tokens, steps = _decode(model, r.cache, last, r.mask, r.pos, eos_id, max_new, agree or bool, top, pick)
    return tokens, scores, steps


def _score_choices(
    model, cache, last: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, choices: list[list[int]], pad_id: int
):
    B, C = last.shape[0], len(choices)
    first = torch.tensor([c[0] for c in choices], device=last.device)  # (C,)
    scores = to_logits(model, last).float().log_softmax(-1)[:, first]  # (B, C): each candidate's first token
    rest = max(len(c) for c in choices) - 1
    if rest == 0:
        return scores.cpu()
    cache.batch_repeat_interleave(C)  # (B*C, ...): row-major, candidate-minor
    ids = torch.tensor(
        [c + [pad_id] * (rest + 1 - len(c)) for c in choices], device=last.device
    )  # (C, L), padded on the right
    real = torch.tensor([[1] * len(c) + [0] * (rest + 1 - len(c)) for c in choices], device=last.device)  # (C, L)
    tail = model.base_model(
        input_ids=ids[:, :-1].repeat(B, 1),  # (B*C, L-1): a candidate's tokens predict its next ones
        attention_mask=torch.cat([mask.repeat_interleave(C, 0), real[:, :-1].repeat(B, 1)], dim=1),
        position_ids=pos[:, -1:].repeat_interleave(C, 0) + torch.arange(1, rest + 1, device=last.device),
        use_cache=True,
        **with_cache(model, cache),
    ).last_hidden_state  # (B*C, L-1, H)
    targets = ids[:, 1:].repeat(B, 1)  # (B*C, L-1)
    keep = real[:, 1:].repeat(B, 1).bool()  # (B*C, L-1): real tokens only
    logp = -F.cross_entropy(to_logits(model, tail[keep]).float(), targets[keep], reduction="none")  # (N,)
    row = torch.arange(B * C, device=last.device).unsqueeze(1).expand_as(keep)[keep]  # (N,)
    more = torch.zeros(B * C, device=last.device).index_add_(0, row, logp)  # (B*C,)
    return (scores + more.view(B, C)).cpu()


def _decode(
    model, cache, last, mask: torch.Tensor, pos: torch.Tensor, eos_id: int, max_new: int, agree, top: int | None, pick
) -> tuple[list[list[int]], list[list[Step]] | None]:
    B = last.shape[0]
    results: list[list[int]] = [[] for _ in range(B)]
    steps: list[list[Step]] | None = None if top is None else [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=mask.device)
    for step in range(max_new):
        logits = to_logits(model, last)  # (B, V)
        nxt = logits.argmax(-1) if pick is None else pick(logits)  # (B,)
        done |= nxt == eos_id
        live = (~done).nonzero().flatten().tolist()
        for i in live:
            results[i].append(int(nxt[i]))
        if steps is not None:
            _record(steps, live, logits, nxt, top or 0)
        if agree(bool(done.all())) or step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)  # (B, S+step+1)
        pos = pos[:, -1:] + 1  # (B, 1)
        out = model.base_model(
            input_ids=nxt.unsqueeze(1),
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **with_cache(model, cache),
        )
        last, cache = out.last_hidden_state[:, -1], cache_of(out)
    return results, steps


def _record(steps: list[list[Step]], live: list[int], logits: torch.Tensor, nxt: torch.Tensor, top: int) -> None:
    """Append each live row's greedy token, its log-probability and the `top` likeliest tokens (best first)."""
    logp = logits.float().log_softmax(-1)  # (B, V)
    best, ids = logp.topk(max(top, 1), dim=-1)  # (B, top)
    for i in live:
        t = int(nxt[i])
        alts = tuple(zip(ids[i, :top].tolist(), best[i, :top].tolist()))
        steps[i].append(Step(t, float(logp[i, t]), alts))


def choice_scores(
    model, prompts: torch.Tensor, seqs: list[list[int]], choices: list[list[int]], pad_id: int, which=None
) -> torch.Tensor:
    """Summed log-likelihood of each candidate answer after each row: (B, C)."""
    scores = decode_or_score(model, prompts, seqs, pad_id, pad_id, which=which, choices=choices)[1]
    assert scores is not None  # choices given, so decode_or_score() scored them
    return scores
