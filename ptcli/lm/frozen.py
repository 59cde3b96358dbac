"""Running rows from, or up to, a block: the frozen states below a late prompt, computed once, and the blocks above.

Nothing below a late prompt's block K depends on it (depth.py), so tuning computes each
row's states entering block K once (`states_below`) and each step runs only the blocks from
K up (`hidden_above`). Blocks are skipped by standing in for them (`_Skip`), not by slicing
the stack, because some models pick each block's mask by its index.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ptcli.lm.batch import IGNORE, left_pad, right_pad, stack, with_cache
from ptcli.lm.depth import blocks_of, deeper, replacing, vectors_at
from ptcli.lm.placed import first_slots


class _Skip(nn.Module):
    """Stands in for a block that need not run: passes its input on, in the block's own return form."""

    def __init__(self, tuple_of: int):
        super().__init__()
        self.tuple_of = tuple_of  # 0: the block returns a tensor; n: a tuple of n, hidden states first

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states, *([None] * (self.tuple_of - 1))) if self.tuple_of else hidden_states


def _return_form(model) -> int:
    """0 when a block returns its hidden states, n when it returns a tuple of n (older models): learnt once."""
    if not hasattr(model, "_ptcli_block_form"):
        got: dict[str, int] = {}

        def look(_module, _args, out) -> None:  # returns None: the block's output stays as it is
            got.setdefault("n", len(out) if isinstance(out, tuple) else 0)

        handle = blocks_of(model)[0].register_forward_hook(look)
        try:
            with torch.no_grad():
                model.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False)
        finally:
            handle.remove()
        model._ptcli_block_form = got["n"]
    return model._ptcli_block_form


@contextmanager
def _skipping(model, which: range):
    blocks = blocks_of(model)
    real = [blocks[i] for i in which]
    form = _return_form(model)
    for i in which:
        blocks[i] = _Skip(form)
    try:
        yield
    finally:
        for i, block in zip(which, real):
            blocks[i] = block


def _rows(model, seqs: list[list[int]]):
    device = model.get_input_embeddings().weight.device
    ids = right_pad(seqs, 0).to(device)  # (B, T); prompt vector j is -(j+1)
    mask = right_pad([[1] * len(s) for s in seqs], 0).to(device)  # (B, T)
    pos = torch.arange(ids.shape[1], device=device).expand_as(ids)  # (B, T): right pads sit after every real slot
    return ids, mask, pos


@torch.no_grad()
def states_below(model, layer: int, seqs: list[list[int]]) -> list[torch.Tensor]:
    """The states entering block `layer` of whole rows (prompt slots as zeros): one (T_i, H) tensor a row.

    Rows hold their prompt slots as negative ids, in place ([prompt][text][answer] for the prefix layout).
    """
    ids, mask, pos = _rows(model, seqs)
    embeds = model.get_input_embeddings()(ids.clamp(min=0)).masked_fill((ids < 0).unsqueeze(-1), 0.0)  # (B, T, H)
    states = _entering_blocks(model, range(layer, layer + 1), embeds, mask, pos)[0]  # (B, T, H)
    return [states[i, : len(s)].clone() for i, s in enumerate(seqs)]


@torch.no_grad()
def lifted(model, layer: int, vectors: torch.Tensor, depth: int = 1) -> torch.Tensor:
    """Initial vectors (P, H) read as a row of input embeddings: their states entering blocks layer .. layer+depth-1,
    (depth*P, H). At block 0 they stay the vectors themselves.

    A late or deep prompt starts where its init (text, labels, vocabulary) would stand at each
    of its blocks, at the scale of the stream there, not at the scale of input embeddings. The
    row starts with one token more (the base's BOS or EOS), dropped after: a row's first
    position gathers outsized activations (an attention sink), and the prompt sits mid-row.
    """
    emb = model.get_input_embeddings()
    config = model.config.get_text_config()
    first = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    lead = (
        emb(torch.tensor([first], device=emb.weight.device)) if first is not None else torch.zeros_like(emb.weight[:1])
    )
    embeds = torch.cat([lead, vectors.to(emb.weight)])[None]  # (1, 1+P, H)
    T = embeds.shape[1]
    mask = torch.ones(1, T, dtype=torch.long, device=emb.weight.device)
    out = _entering_blocks(model, range(layer, layer + depth), embeds, mask, torch.arange(T, device=mask.device)[None])
    if layer == 0:
        out[0] = embeds
    return torch.cat([h[0, 1:] for h in out]).to(vectors)  # (depth*P, H)


def _entering_blocks(model, which: range, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor):
    """Hidden states (B, T, H) entering each block of `which`; the blocks after the last do not run."""
    got: dict[int, torch.Tensor] = {}
    blocks = blocks_of(model)

    def grab(i):
        def hook(_module, args, kwargs):
            got[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [blocks[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in which]
    try:
        with _skipping(model, range(which[-1] + 1, len(blocks))):
            model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [got[i] for i in which]


def first_rows(example: list[int]) -> dict[int, int]:
    """Each example's first row: example[r] is the example (0 .. E-1) row r belongs to."""
    return {e: r for r, e in reversed(list(enumerate(example)))}


TextKV = list[tuple[torch.Tensor, torch.Tensor]]  # one text's keys and values (heads, T1, d), a block from K up


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
        cache.batch_select_indices(torch.tensor(example, device=device))  # (E, ...) -> (B, ...)
        post_ids = [s[c:] for s, c in zip(seqs, cut)]
        out = _above(model, layer, depth, rows, states, post_ids, cache, pre_mask[example])
        lab = right_pad([lab[c:] for lab, c in zip(labels, cut)], IGNORE).to(device)  # (B, T2)
    sel = lab[:, 1:] != IGNORE  # position t predicts token t+1
    row_of = torch.arange(len(seqs), device=device).unsqueeze(1).expand_as(sel)[sel]  # (N,)
    return out[:, :-1][sel], lab[:, 1:][sel], row_of  # (N, H), (N,), (N,)


@torch.no_grad()
def text_kv(model, layer: int, texts: list[torch.Tensor]) -> list[TextKV]:
    """Texts' states entering `layer` (T1_e, H) through the blocks from `layer` up, without gradient: each text's keys
    and values at those blocks. No prompt reaches a text that comes before it, so these hold for every step."""
    from transformers import DynamicCache

    device = texts[0].device
    mask = left_pad([[1] * len(t) for t in texts], 0).to(device)  # (E, T1)
    hidden = torch.zeros(len(texts), mask.shape[1], texts[0].shape[-1], dtype=texts[0].dtype, device=device)
    for e, t in enumerate(texts):
        hidden[e, mask.shape[1] - len(t) :] = t  # (E, T1, H)
    cache = DynamicCache()
    blocks = blocks_of(model)
    with replacing(blocks[layer], mask.bool(), hidden), _skipping(model, range(layer)):
        model.base_model(
            input_ids=torch.zeros_like(mask),
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
            use_cache=True,
            **with_cache(model, cache),
        )
    layers: Any = cache.layers[layer:]  # attention layers only: init refuses recurrent bases
    T1 = mask.shape[1]
    return [
        [(c.keys[e, :, T1 - len(t) :].clone(), c.values[e, :, T1 - len(t) :].clone()) for c in layers]
        for e, t in enumerate(texts)
    ]


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
    ids, real, _ = _rows(model, seqs)
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
        _skipping(model, range(layer)),
    ):
        out = model.base_model(
            input_ids=ids.clamp(min=0),
            attention_mask=mask,
            position_ids=pos,
            use_cache=cache is not None,
            **with_cache(model, cache),
        )
    return out.last_hidden_state
