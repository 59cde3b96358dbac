"""`ptcli init`'s probe: ptcli's fast paths must give what a plain forward gives on this base.

It sits above forward.py, which it checks (arch.py holds the facts it needs about families).
"""

from __future__ import annotations

import inspect

from ptcli.errors import ModelError


def check_supported(model, ref: str) -> None:
    """Refuse a loaded base that takes no `inputs_embeds`, or on which ptcli's fast paths fail or disagree
    with a plain forward.

    The probe: two rows of different lengths behind a 2-vector prompt, their loss (rows padded
    on the right) and a 2-token answer's score after each (rows padded on the left, then
    extended) must equal the same computed one row at a time without padding. It catches an
    architecture whose cache, padding or positions ptcli's layouts do not fit, at init
    rather than mid-tune. (Short rows: the window rule is `shared_prefix_exact`'s.)
    """
    import torch

    from ptcli.lm.forward import IGNORE, choice_scores, lm_loss

    if "inputs_embeds" not in inspect.signature(model.base_model.forward).parameters:
        raise ModelError(
            f"{ref!r} ({model.config.model_type}) does not accept inputs_embeds, so a soft prompt cannot be fed to it",
            hint="pick a causal LM whose forward takes inputs_embeds (most Hugging Face models do)",
        )
    prompt = model.get_input_embeddings().weight[:2].detach().float()  # (2, H): two vocabulary rows
    rows, answer = [[1, 2, 3], [4]], [5, 6]
    try:
        with torch.no_grad():
            fast = lm_loss(model, prompt, rows, rows, 0)[0] - choice_scores(model, prompt, rows, [answer], 0).sum()
            plain = sum(
                _row_nll(model, prompt, r, r) + _row_nll(model, prompt, r + answer, [IGNORE] * len(r) + answer)
                for r in rows
            )
    except Exception as e:  # whatever breaks inside transformers, the user gets one clear refusal
        raise ModelError(
            f"ptcli cannot run {ref!r} ({model.config.model_type}) behind a soft prompt: {type(e).__name__}: {e}",
            hint="pick an attention-only causal LM (GPT-2, Llama, Qwen, Mistral, Gemma, ...)",
        ) from e
    if not torch.isclose(fast, plain.to(fast.device), rtol=1e-4, atol=1e-4):
        raise ModelError(
            f"on {ref!r} ({model.config.model_type}) ptcli's batched forward gives a loss of {float(fast):.5f} where "
            f"one row at a time gives {float(plain):.5f}",
            hint="pick another causal LM, and report the model to ptcli",
        )


def _row_nll(model, prompt, row: list[int], labels: list[int]):
    """Summed cross entropy of one row read whole and unpadded behind the prompt, [prompt][row]: the plain answer."""
    import torch
    import torch.nn.functional as F

    emb = model.get_input_embeddings()
    ids = torch.tensor([row], device=emb.weight.device)  # (1, T)
    embeds = torch.cat([prompt.to(emb.weight).unsqueeze(0), emb(ids)], dim=1)  # (1, P+T, H)
    logits = model(inputs_embeds=embeds).logits[0, prompt.shape[0] - 1 : -1]  # (T, V): prompt end predicts row[0]
    return F.cross_entropy(logits.float(), torch.tensor(labels, device=logits.device), reduction="sum")
