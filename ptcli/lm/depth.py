"""Where a prompt enters the stream: before block 0 (the seed's input prompt) or before block K (a late prompt).

A prompt that enters at block K > 0 (Late Prompt Tuning, Liu et al. 2022) holds its slots'
hidden states at the input of block K. Below K its slots carry zero vectors, so nothing
below K depends on the prompt: the states entering block K are the same every epoch
(`states_below` computes them once, tuning keeps them) and no gradient runs below K.

`entering(model, K)` sets the block for the forward calls inside it; `forward_with` is how
every path feeds prompt vectors to the base (forward.py's shared prefix, placed.py's
templates), so inference, validation and serving honour K by construction. `logprobs_above`
runs rows from saved block-K states through the blocks above only: the training step of a
late prompt. Blocks are skipped by standing in for them (`_Skip`), not by slicing the stack,
because some models pick each block's mask by its index.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ptcli.lm.batch import IGNORE, right_pad, stack, to_logits

_LAYER = "_ptcli_prompt_layer"


def blocks_of(model) -> nn.ModuleList:
    """The base's stack of decoder blocks: the shallowest ModuleList as long as the config's layer count."""
    n = model.config.get_text_config().num_hidden_layers
    for _, module in sorted(model.base_model.named_modules(), key=lambda kv: kv[0].count(".")):
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise AssertionError(f"no stack of {n} blocks in {type(model.base_model).__name__}")


def num_blocks(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def prompt_layer(model) -> int:
    """The block the current prompts enter before (0: the input embeddings)."""
    return getattr(model, _LAYER, 0)


@contextmanager
def entering(model, layer: int):
    """Prompts fed inside this block enter the stream before block `layer`."""
    before = prompt_layer(model)
    setattr(model, _LAYER, layer)
    try:
        yield
    finally:
        setattr(model, _LAYER, before)


@contextmanager
def _replacing(block: nn.Module, where: torch.Tensor, vectors: torch.Tensor):
    """Block's input hidden states (B, T, H) take `vectors` (B, T, H) where `where` (B, T) holds."""

    def hook(_module, args, kwargs):
        if args:
            h = args[0]
            return (torch.where(where.to(h.device).unsqueeze(-1), vectors.to(h), h), *args[1:]), kwargs
        h = kwargs["hidden_states"]
        kwargs["hidden_states"] = torch.where(where.to(h.device).unsqueeze(-1), vectors.to(h), h)
        return args, kwargs

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def forward_with(model, embeds: torch.Tensor, where: torch.Tensor, vectors: torch.Tensor, **kwargs):
    """model.base_model on input embeddings (B, T, H) whose slots `where` (B, T) hold prompt vectors (B, T, H).

    At block 0 the vectors are the input; at block K the slots enter as zeros and take the
    vectors at block K's input.
    """
    layer = prompt_layer(model)
    slots = where.unsqueeze(-1)
    if layer == 0:
        return model.base_model(inputs_embeds=torch.where(slots, vectors.to(embeds), embeds), **kwargs)
    with _replacing(blocks_of(model)[layer], where, vectors):
        return model.base_model(inputs_embeds=embeds.masked_fill(slots, 0.0), **kwargs)


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
    states = _entering_block(model, layer, embeds, mask, pos)  # (B, T, H)
    return [states[i, : len(s)].clone() for i, s in enumerate(seqs)]


@torch.no_grad()
def lifted(model, layer: int, vectors: torch.Tensor) -> torch.Tensor:
    """Initial vectors (P, H) read as a row of input embeddings: their states entering block `layer` (P, H).

    A late prompt starts where its init (text, labels, vocabulary) would stand at block K, at
    the scale of the stream there, not at the scale of input embeddings.
    """
    device = model.get_input_embeddings().weight.device
    embeds = vectors.to(device=device, dtype=model.get_input_embeddings().weight.dtype)[None]  # (1, P, H)
    P = vectors.shape[0]
    mask = torch.ones(1, P, dtype=torch.long, device=device)
    out = _entering_block(model, layer, embeds, mask, torch.arange(P, device=device)[None])
    return out[0].to(vectors)


def _entering_block(model, layer: int, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, T, H) entering block `layer`; the blocks from `layer` up do not run."""
    got: dict[str, torch.Tensor] = {}

    def grab(_module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]

    blocks = blocks_of(model)
    handle = blocks[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with _skipping(model, range(layer + 1, len(blocks))):
            model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        handle.remove()
    return got["h"]


def logprobs_above(
    model,
    layer: int,
    prompts: torch.Tensor,
    states: list[torch.Tensor],
    seqs: list[list[int]],
    labels: list[list[int]],
    which=None,
):
    """Log-probability of every labelled token (N,) and its row (N,), running only the blocks from `layer` up.

    states[i] (T_i, H) are row i's states entering block `layer` (`states_below`); its prompt
    slots take the vectors of prompts[which[i]] ((K, P, H)). The same numbers as
    forward.token_logprobs on these rows inside `entering(model, layer)`.
    """
    prompts, which = stack(prompts, len(seqs), which)
    ids, mask, pos = _rows(model, seqs)
    B, T = ids.shape
    hidden = torch.zeros(B, T, states[0].shape[-1], dtype=states[0].dtype, device=ids.device)  # (B, T, H)
    for i, s in enumerate(states):
        hidden[i, : s.shape[0]] = s.to(ids.device)
    rows = prompts.to(ids.device)[which.to(ids.device)]  # (B, P, H)
    slot = (-ids - 1).clamp(min=0)  # (B, T): which prompt vector sits here
    vectors = torch.gather(rows, 1, slot.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))  # (B, T, H)
    hidden = torch.where((ids < 0).unsqueeze(-1), vectors.to(hidden.dtype), hidden)
    blocks = blocks_of(model)
    with _replacing(blocks[layer], torch.ones_like(mask, dtype=torch.bool), hidden), _skipping(model, range(layer)):
        out = model.base_model(input_ids=ids.clamp(min=0), attention_mask=mask, position_ids=pos, use_cache=False)
    lab = right_pad(labels, IGNORE).to(ids.device)  # (B, T)
    sel = lab[:, 1:] != IGNORE  # (B, T-1): position t predicts token t+1
    row_of = torch.arange(B, device=ids.device).unsqueeze(1).expand_as(sel)[sel]  # (N,)
    h = out.last_hidden_state[:, :-1][sel]  # (N, H)
    logp = -F.cross_entropy(to_logits(model, h).float(), lab[:, 1:][sel], reduction="none")  # (N,)
    return logp, row_of
