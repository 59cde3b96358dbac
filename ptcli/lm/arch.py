"""What ptcli needs of a base model's architecture, and the one rule for sliding-window attention.

ptcli feeds the frozen base `inputs_embeds` (the soft prompt is a run of vectors, not tokens)
and reads it as a decoder-only stack of attention layers; bases without that are refused
(`check_config` whenever a base loads, lm/probe.py's `check_supported` at `ptcli init`),
before any prompt is tuned on them.

Sliding windows (Mistral, Gemma-2/3 local layers, Qwen2/3 with use_sliding_window, Phi-3,
Starcoder2, ...; chunked attention alike) are counted in cache slots, not positions: every
slot in the key/value cache between a query and a key counts against the window, pads
included. So a layout is exact under any window when every row's real slots are contiguous
(prompt, text, then whatever is appended; pads only before or after them), and a layout
with pads inside a row (the shared-prefix layout `[prompt][pads][tokens]` that decoding
extends, or a template's gaps) is exact only while the whole padded row fits in the window:
then every key is visible with pads or without. `shared_prefix_exact` is that test; a
layout that fails it can move its pads to a row's ends (forward.pads_first) instead.
"""

from __future__ import annotations

from ptcli.errors import ModelError

WINDOWED_LAYERS = ("sliding_attention", "chunked_attention")
RECURRENT_LAYERS = ("linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba")  # a state, not a key/value cache


def window_of(model) -> int | None:
    """The attention window of the base in cache slots (sliding or chunked), or None when attention is global.

    Conservative: a window in the config counts unless the config says it is off
    (`use_sliding_window: false`) or lists no windowed layer in `layer_types`.
    """
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types and not any(t in WINDOWED_LAYERS for t in types):
        return None
    return window


def shared_prefix_exact(model, width: int) -> bool:
    """Whether a layout with pads inside rows gives the unpadded answer, for rows `width` cache slots wide.

    width counts everything a row occupies in the cache, pads included: prompt + longest
    row (+ tokens appended later: decoded tokens, candidate answers).
    """
    window = window_of(model)
    return window is None or width <= window


def check_config(config, ref: str) -> None:
    """Refuse, from the config and before any weights load, a base ptcli cannot tune.

    An encoder-decoder's decoder alone (BART's causal-LM class, say) would load but read no
    encoder output. Recurrent layers (Mamba, linear attention, short convolutions) keep a
    state, not a key/value cache: it cannot be shared across rows or have its pads moved
    (transformers fails on it at the first batch).
    """
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{ref!r} is an encoder-decoder model ({config.model_type}); "
            "ptcli tunes decoder-only (causal) language models",
            hint="pick a causal LM (GPT-2, Llama, Qwen, Mistral, Gemma, ...)",
        )
    recurrent = sorted(set(getattr(config.get_text_config(), "layer_types", None) or []) & set(RECURRENT_LAYERS))
    if recurrent:
        raise ModelError(
            f"{ref!r} ({config.model_type}) has recurrent layers ({', '.join(recurrent)}); ptcli shares each prompt's "
            "key/value cache across rows and pads between them, which a recurrent state cannot take",
            hint="pick an attention-only causal LM (GPT-2, Llama, Qwen, Mistral, Gemma, ...)",
        )
