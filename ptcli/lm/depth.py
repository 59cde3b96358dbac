"""Where a prompt enters the stream: before block 0 (the seed's input prompt) or block K (a late prompt), once or at
every block from there up (a deep prompt).

A prompt that enters at block K > 0 (Late Prompt Tuning, Liu et al. 2022) holds its slots'
hidden states at the input of block K. Below K its slots carry zero vectors, so nothing
below K depends on the prompt: the states entering block K are the same every epoch
(frozen.py computes them once, above.py runs the blocks above). A deep prompt (P-tuning v2, Liu
et al. 2022, as hidden states) gives each block from K up its own P vectors: at each of
those blocks' inputs the slots' states are set to that block's vectors. A prompt of depth D
is one (D*P, H) tensor: rows d*P .. d*P+P-1 are block K+d's.

`entering(model, K, D)` sets the block and depth for the forward calls inside it;
`forward_with` is how every path feeds prompt vectors to the base (forward.py's shared
prefix, placed.py's templates), so inference, validation and serving honour them by
construction.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

_LAYER, _DEPTH = "_ptcli_prompt_layer", "_ptcli_prompt_depth"


def blocks_of(model) -> nn.ModuleList:
    """The base's stack of decoder blocks: the shallowest ModuleList as long as the config's layer count."""
    n = num_blocks(model)
    for _, module in sorted(model.base_model.named_modules(), key=lambda kv: kv[0].count(".")):
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise AssertionError(f"no stack of {n} blocks in {type(model.base_model).__name__}")


def num_blocks(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def prompt_layer(model) -> int:
    """The block the current prompts enter before (0: the input embeddings)."""
    return getattr(model, _LAYER, 0)


def prompt_depth(model) -> int:
    """How many blocks, from prompt_layer up, the current prompts give vectors to (1: shallow)."""
    return getattr(model, _DEPTH, 1)


def depth_of(model, layer: int, deep: bool) -> int:
    return num_blocks(model) - layer if deep else 1


@contextmanager
def entering(model, layer: int, depth: int = 1):
    """Prompts fed inside this block enter the stream before block `layer`, and set `depth` blocks from there."""
    before = prompt_layer(model), prompt_depth(model)
    setattr(model, _LAYER, layer)
    setattr(model, _DEPTH, depth)
    try:
        yield
    finally:
        setattr(model, _LAYER, before[0])
        setattr(model, _DEPTH, before[1])


@contextmanager
def replacing(block: nn.Module, where: torch.Tensor, vectors: torch.Tensor):
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


def vectors_at(rows: torch.Tensor, slot: torch.Tensor, d: int, depth: int) -> torch.Tensor:
    """The vectors (B, T, H) that positions `slot` (B, T; prompt vector index, -1 on tokens) take at the
    prompt's d-th block, from rows (B, depth*P, H)."""
    P = rows.shape[1] // depth
    at = rows[:, d * P : (d + 1) * P]  # (B, P, H)
    return torch.gather(at, 1, slot.clamp(min=0).unsqueeze(-1).expand(-1, -1, at.shape[-1]))  # (B, T, H)


def deeper(model, layer: int, depth: int, rows: torch.Tensor, slot: torch.Tensor) -> ExitStack:
    """Hooks that set the slots at blocks layer+1 .. layer+depth-1 to their own vectors (a deep prompt)."""
    stack = ExitStack()
    blocks, where = blocks_of(model), slot >= 0
    for d in range(1, depth):
        stack.enter_context(replacing(blocks[layer + d], where, vectors_at(rows, slot, d, depth)))
    return stack


def with_vectors(embeds: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor, depth: int = 1) -> torch.Tensor:
    """Input embeddings (B, T, H) whose positions `slot` (B, T) >= 0 take their prompt vectors from rows
    (B, depth*P, H): what block 0 reads for a prompt that enters at the input (and what `ptcli embed` writes)."""
    first = vectors_at(rows, slot, 0, depth).to(embeds)  # (B, T, H)
    return torch.where((slot >= 0).unsqueeze(-1), first, embeds)


def forward_with(model, embeds: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor, **kwargs):
    """model.base_model on input embeddings (B, T, H) whose positions `slot` (B, T) >= 0 hold prompt vectors.

    slot: the prompt vector each position holds (-1: a token); rows (B, D*P, H): each row's
    prompt. At block 0 the vectors are the input; at block K the slots enter as zeros and
    take their vectors at block K's input; a deep prompt's slots take theirs at every block after.
    """
    layer, depth = prompt_layer(model), prompt_depth(model)
    with deeper(model, layer, depth, rows, slot):
        if layer == 0:
            return model.base_model(inputs_embeds=with_vectors(embeds, slot, rows, depth), **kwargs)
        where = slot >= 0  # (B, T)
        first = vectors_at(rows, slot, 0, depth).to(embeds)  # (B, T, H)
        with replacing(blocks_of(model)[layer], where, first):
            return model.base_model(inputs_embeds=embeds.masked_fill(where.unsqueeze(-1), 0.0), **kwargs)
