"""A late prompt's step: rows from their states entering block K through the blocks above it.

Tuning keeps each row's states entering block K (frozen.py) and, in the suffix layout, its
text's keys and values from K up; a step runs only the prompt and the answer through the
blocks from K up (`hidden_above`). Candidates of one example (--loss choices) share the
prompt and what follows it up to the answer: that runs once per example, and each candidate
continues from its keys and values.
"""

from __future__ import annotations

import torch

from ptcli.lm.batch import IGNORE, left_pad, right_pad, stack, with_cache
from ptcli.lm.depth import blocks_of, deeper, replacing, vectors_at
from ptcli.lm.frozen import TextKV, first_rows, rows_of, shared_length, skipping, text_kv
from ptcli.lm.placed import first_slots


def hidden_above(
    model,
    layer: int,
    prompts: torch.Tensor,
    states: list[torch.Tensor],
    seqs: list[list[int]],
    labels: list[list[int]],
    which=None,
    example: list[int] | None = None,
    depth: int = 1,
    texts: list[TextKV] | None = None,
):
    """The final hidden state that predicts each labelled token, the token, and its row: (N, H), (N,), (N,),
    running only the blocks from `layer` up (forward.labelled_hidden's numbers for a late prompt).

    states[i] (T_i, H) are row i's states entering block `layer` (`states_below`); its prompt
    slots take the vectors of prompts[which[i]] ((K, depth*P, H)). The same numbers as
    forward.token_logprobs on these rows inside `entering(model, layer, depth)`.

    Rows whose first slot comes after some text (the suffix layout) split there, as placed.py
    splits them: no prompt reaches the text, so it runs without gradient, once per `example`
    (rows of one example, the candidates of --loss choices, share their text), and the rest
    continues from its keys and values. `texts`, when given, are those keys and values, one
    entry per example (`text_kv`), and states[i] is then row i from its first slot on. Rows
    whose prompt comes first run whole.
    """
    prompts, which = stack(prompts, len(seqs), which)
    device = model.get_input_embeddings().weight.device
    rows = prompts.to(device)[which.to(device)]  # (B, P, H)
    cut = first_slots(seqs)
    if min(cut) == 0:
        out = _above(model, layer, depth, rows, states, seqs, None, None)
        lab = right_pad(labels, IGNORE).to(device)  # (B, T)
    else:
        example = example or list(range(len(seqs)))
        if texts is None:
            first = first_rows(example)
            texts = text_kv(model, layer, [states[first[e]][: cut[first[e]]] for e in range(len(first))])
            states = [s[c:] for s, c in zip(states, cut)]
        cache, pre_mask = _cache_of(model, layer, texts)
        post_ids = [s[c:] for s, c in zip(seqs, cut)]
        shared = shared_length(post_ids, example)
        if shared:
            out = _above_shared(model, layer, depth, rows, states, post_ids, example, cache, pre_mask, shared)
        else:
            cache.batch_select_indices(torch.tensor(example, device=device))  # (E, ...) -> (B, ...)
            out = _above(model, layer, depth, rows, states, post_ids, cache, pre_mask[example])
        lab = right_pad([lab[c:] for lab, c in zip(labels, cut)], IGNORE).to(device)  # (B, T2)
    sel = lab[:, 1:] != IGNORE  # position t predicts token t+1
    row_of = torch.arange(len(seqs), device=device).unsqueeze(1).expand_as(sel)[sel]  # (N,)
    return out[:, :-1][sel], lab[:, 1:][sel], row_of  # (N, H), (N,), (N,)


def _above_shared(model, layer: int, depth: int, rows, states, posts, example, cache, pre_mask, s: int):
    """`_above` for rows whose posts' first `s` positions are their example's: those run once per example, and
    each row's own positions continue from their keys and values. (B, s+T, H), right-padded as `_above`'s."""
    first = first_rows(example)
    heads = [first[e] for e in range(len(first))]
    head = _above(
        model, layer, depth, rows[heads], [states[r][:s] for r in heads], [posts[r][:s] for r in heads], cache, pre_mask
    )  # (E, s, H); the cache now holds the shared positions from block `layer` up
    keys = cache.layers[layer].keys  # (E, heads, T1+s, d)
    for i in range(layer):  # blocks that did not run: zeros keep the cache's length, which the next mask reads
        zeros = keys.new_zeros(keys.shape[0], keys.shape[1], s, keys.shape[-1])
        cache.update(zeros, zeros, i)
    which = torch.tensor(example, device=keys.device)
    cache.batch_select_indices(which)  # (E, ...) -> (B, ...)
    mask = torch.cat([pre_mask, pre_mask.new_ones(len(heads), s)], dim=1)[which]  # (B, T1+s)
    own = _above(model, layer, depth, rows, [st[s:] for st in states], [p[s:] for p in posts], cache, mask)
    return torch.cat([head[which], own], dim=1)  # (B, s+T, H)


def _cache_of(model, layer: int, texts: list[TextKV]):
    """A cache holding the texts' keys and values, left-padded, at the blocks from `layer` up; and its mask (E, T1).

    The blocks below `layer` do not run; their slots get zeros of the right shape, which no
    query reads, so the cache's length (what the next pass's mask is built from) is right.
    """
    from transformers import DynamicCache

    lengths = [kv[0][0].shape[1] for kv in texts]
    mask = left_pad([[1] * n for n in lengths], 0).to(texts[0][0][0].device)  # (E, T1)
    T1 = mask.shape[1]

    def padded(d: int, which: int) -> torch.Tensor:  # (E, heads, T1, d_head)
        first = texts[0][d][which]
        out = first.new_zeros(len(texts), first.shape[0], T1, first.shape[-1])
        for e, kv in enumerate(texts):
            out[e, :, T1 - lengths[e] :] = kv[d][which]
        return out

    cache = DynamicCache()
    above = [(padded(d, 0), padded(d, 1)) for d in range(len(texts[0]))]
    for i in range(layer):
        cache.update(torch.zeros_like(above[0][0]), torch.zeros_like(above[0][1]), i)
    for d, (keys, values) in enumerate(above):
        cache.update(keys, values, layer + d)
    return cache, mask


def _above(model, layer: int, depth: int, rows, states, seqs, cache, pre_mask):
    """The last hidden states (B, T, H) of rows (their states entering `layer`, right-padded, prompt slots filled)
    through the blocks from `layer` up, continuing from `cache` (whose mask is pre_mask) when given."""
    ids, real, _ = rows_of(model, seqs)
    B, T = ids.shape
    hidden = torch.zeros(B, T, states[0].shape[-1], dtype=states[0].dtype, device=ids.device)  # (B, T, H)
    for i, s in enumerate(states):
        hidden[i, : s.shape[0]] = s.to(ids.device)
    slot = torch.where(ids < 0, -ids - 1, -1)  # (B, T): which prompt vector sits here (-1: a token)
    hidden = torch.where((ids < 0).unsqueeze(-1), vectors_at(rows, slot, 0, depth).to(hidden.dtype), hidden)
    mask = real if pre_mask is None else torch.cat([pre_mask, real], dim=1)  # (B, [T1 +] T)
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, mask.shape[1] - T :]  # (B, T)
    block = blocks_of(model)[layer]
    with (
        replacing(block, torch.ones_like(real, dtype=torch.bool), hidden),
        deeper(model, layer, depth, rows, slot),
        skipping(model, range(layer)),
    ):
        out = model.base_model(
            input_ids=ids.clamp(min=0),
            attention_mask=mask,
            position_ids=pos,
            use_cache=cache is not None,
            **with_cache(model, cache),
        )
    return out.last_hidden_state
