"""What every way of running rows behind prompts shares: padding, the prompt stack, the cache argument, the head.

No layout decisions here: forward.py (the prompt first) and placed.py (templates) build on these.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


def stack(
    prompts: torch.Tensor, rows: int, which: torch.Tensor | list[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise to prompts (K, P, H) and which (B,) long."""
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0)  # (1, P, H)
    which = torch.zeros(rows, dtype=torch.long) if which is None else torch.as_tensor(which, dtype=torch.long)
    return prompts, which


def left_pad(rows: list[list[int]], fill: int, width: int | None = None) -> torch.Tensor:
    """(B, width) long tensor, each row right-aligned."""
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
    return out


def right_pad(rows: list[list[int]], fill: int, width: int | None = None) -> torch.Tensor:
    """(B, width) long tensor, each row left-aligned."""
    return left_pad([r[::-1] for r in rows], fill, width).flip(1)  # (B, width)


def to_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary projection of hidden states (..., H) -> (..., V), scaled as the model's own head scales it.

    Cohere's logit_scale, Granite's logits_scaling, Gemma's soft-capping; init's probe
    (lm/probe.py) refuses a base whose head does anything else.
    """
    config = model.config.get_text_config()
    logits = model.get_output_embeddings()(hidden) * (getattr(config, "logit_scale", None) or 1.0)  # (..., V)
    if config.model_type.startswith("granite"):
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass
class Read:
    """A batch of rows read behind their prompts, ready for a loss, decoding or candidate scoring."""

    hidden: torch.Tensor  # (B, T, H): the body's output over the tokens, aligned with left_pad(seqs) (or right_pad)
    prompt_end: torch.Tensor  # (B, H): each row's last prompt slot, which predicts its first token
    tok_mask: torch.Tensor  # (B, T): 1 on real tokens
    mask: torch.Tensor  # (B, S): attention mask over the cache
    pos: torch.Tensor  # (B, 1): position of each row's last token
    cache: Any


def with_cache(model, cache) -> dict:
    """transformers 5 renamed `past_key_values` to `cache` (argument and output); accept both."""
    params = inspect.signature(model.base_model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]
