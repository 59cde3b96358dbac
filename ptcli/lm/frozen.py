"""Running rows up to a block: the frozen states below a late prompt, computed once.

Nothing below a late prompt's block K depends on it (depth.py), so tuning computes each
row's states entering block K once (`states_below`; in the suffix layout each text once
through the whole base and each row's own part below K, `texts_and_posts`), and each step
runs only the blocks from K up (above.py). Blocks are skipped by standing in for them
(`_Skip`), not by slicing the stack, because some models pick each block's mask by its index.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ptcli.lm.batch import left_pad, right_pad, with_cache
from ptcli.lm.depth import blocks_of, replacing


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
def skipping(model, which: range):
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


def rows_of(model, seqs: list[list[int]]):
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
    ids, mask, pos = rows_of(model, seqs)
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


def _entering_blocks(model, which: range, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache=None):
    """Hidden states (B, T, H) entering each block of `which`; the blocks after the last do not run.

    cache: keys and values the rows continue from (mask then covers cache and rows)."""
    got: dict[int, torch.Tensor] = {}
    blocks = blocks_of(model)

    def grab(i):
        def hook(_module, args, kwargs):
            got[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [blocks[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in which]
    try:
        with skipping(model, range(which[-1] + 1, len(blocks))):
            model.base_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=pos,
                use_cache=cache is not None,
                **with_cache(model, cache),
            )
    finally:
        for handle in handles:
            handle.remove()
    return [got[i] for i in which]


def first_rows(example: list[int]) -> dict[int, int]:
    """Each example's first row: example[r] is the example (0 .. E-1) row r belongs to."""
    return {e: r for r, e in reversed(list(enumerate(example)))}


TextKV = list[tuple[torch.Tensor, torch.Tensor]]  # one text's keys and values (heads, T1, d), a block from K up


@torch.no_grad()
def texts_and_posts(
    model, layer: int, texts: list[list[int]], example: list[int], posts: list[list[int]]
) -> tuple[list[TextKV], list[torch.Tensor]]:
    """Each text (token ids) through the whole base once: its keys and values from block `layer` up (`text_kv`'s);
    and each post (a row from its first prompt slot on, slots as zeros) continued from its example's text below
    `layer`: its states entering that block, (T2_i, H) a row (the post part of `states_below`'s).

    The candidates of one text share its pass: the text runs once, not once per candidate.
    """
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    mask = left_pad([[1] * len(t) for t in texts], 0).to(device)  # (E, T1)
    cache = DynamicCache()
    model.base_model(
        input_ids=left_pad(texts, 0).to(device),
        attention_mask=mask,
        position_ids=(mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
        **with_cache(model, cache),
    )
    kvs = _kv_from(cache, layer, [len(t) for t in texts], mask.shape[1])
    if not posts:
        return kvs, []
    groups = sorted(set(example))  # the texts that have posts to run
    at = {e: g for g, e in enumerate(groups)}
    cache.batch_select_indices(torch.tensor(groups, device=device))  # (E, ...) -> (G, ...)
    mask = mask[groups]
    s = shared_length(posts, example)  # the candidates of a text share its prompt slots and what follows them
    shared = None
    if s:
        first = first_rows(example)
        shared, mask = _continued(model, layer, cache, mask, [posts[first[e]][:s] for e in groups])  # (G, s, H)
    which = [at[e] for e in example]
    cache.batch_select_indices(torch.tensor(which, device=device))  # (G, ...) -> (R, ...)
    own, _ = _continued(model, layer, cache, mask[which], [p[s:] for p in posts])  # (R, T2-s, H)
    if shared is not None:
        own = torch.cat([shared[which], own], dim=1)  # (R, T2, H)
    return kvs, [own[i, : len(p)].clone() for i, p in enumerate(posts)]


def _continued(model, layer: int, cache, mask: torch.Tensor, posts: list[list[int]]):
    """Posts (prompt slots as zeros) continued from `cache` (whose mask is `mask`) below `layer`: their states
    entering it (B, T2, H), right-padded, and the mask that now covers them too."""
    ids, real, _ = rows_of(model, posts)  # (B, T2)
    embeds = model.get_input_embeddings()(ids.clamp(min=0)).masked_fill((ids < 0).unsqueeze(-1), 0.0)  # (B, T2, H)
    full = torch.cat([mask, real], dim=1)  # (B, T1+T2)
    pos = (full.cumsum(1) - 1).clamp(min=0)[:, mask.shape[1] :]  # (B, T2)
    return _entering_blocks(model, range(layer, layer + 1), embeds, full, pos, cache)[0], full


def shared_length(posts: list[list[int]], example: list[int]) -> int:
    """How many leading positions every row's post shares with the other rows of its example (the prompt and what
    follows it up to the candidates, under --loss choices), leaving each row one of its own; 0 when no example has
    two rows."""
    first = first_rows(example)
    if len(first) == len(example):
        return 0
    n = min(len(p) for p in posts) - 1
    for r, e in enumerate(example):
        head = posts[first[e]]
        n = min(n, next((i for i, (a, b) in enumerate(zip(head, posts[r])) if a != b), n))
    return max(n, 0)


def _kv_from(cache, layer: int, lengths: list[int], T1: int) -> list[TextKV]:
    """Each left-padded text's keys and values at the blocks from `layer` up, unpadded."""
    layers: Any = cache.layers[layer:]  # attention layers only: init refuses recurrent bases
    return [
        [(c.keys[e, :, T1 - n :].clone(), c.values[e, :, T1 - n :].clone()) for c in layers]
        for e, n in enumerate(lengths)
    ]


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
    with replacing(blocks[layer], mask.bool(), hidden), skipping(model, range(layer)):
        model.base_model(
            input_ids=torch.zeros_like(mask),
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
            use_cache=True,
            **with_cache(model, cache),
        )
    return _kv_from(cache, layer, [len(t) for t in texts], mask.shape[1])
