"""Plain reference computations the tests hold ptcli's fast paths to, and wrappers only tests use.

`assemble` lays every row out in full, [pad ...][prompt][tokens], and `plain_lm_loss` runs it
with logits everywhere: slow, obviously right, and so not in the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptcli.lm.batch import IGNORE, left_pad, stack
from ptcli.lm.forward import decode_or_score


def assemble(model, prompts: torch.Tensor, seqs: list[list[int]], pad_id: int, which=None):
    """Lay out [pad ...][soft prompt][tokens] per row.

    Returns inputs_embeds (B, S, H), attention_mask (B, S) and position_ids (B, S) with
    S = P + longest row.
    """
    prompts, which = stack(prompts, len(seqs), which)
    emb = model.get_input_embeddings()
    device = emb.weight.device
    P = prompts.shape[1]
    ids = left_pad(seqs, pad_id).to(device)  # (B, T)
    mask = left_pad([[1] * (P + len(s)) for s in seqs], 0, P + ids.shape[1]).to(device)  # (B, S)
    is_prompt = left_pad([[1] * P + [0] * len(s) for s in seqs], 0, P + ids.shape[1]).bool().to(device)  # (B, S)
    ids = torch.cat([torch.full((len(seqs), P), pad_id, dtype=torch.long, device=device), ids], dim=1)  # (B, S)
    tok_embeds = emb(ids)  # (B, S, H); prompt slots hold pad embeddings until replaced
    slot = (is_prompt.long().cumsum(1) - 1).clamp(min=0)  # (B, S): which prompt vector sits here
    rows = prompts.to(device=device, dtype=tok_embeds.dtype)[which.to(device)]  # (B, P, H)
    prompt_embeds = torch.gather(rows, 1, slot.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))  # (B, S, H)
    embeds = torch.where(is_prompt.unsqueeze(-1), prompt_embeds, tok_embeds)  # (B, S, H)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # (B, S)
    return embeds, mask, position_ids


def plain_lm_loss(
    model, prompts: torch.Tensor, seqs: list[list[int]], labels: list[list[int]], pad_id: int, which=None
):
    """`forward.lm_loss` the plain way: every row in full, logits everywhere. Summed cross entropy and count."""
    P = prompts.shape[-2]
    embeds, mask, pos = assemble(model, prompts, seqs, pad_id, which)  # (B, S, H), (B, S), (B, S)
    S = embeds.shape[1]
    lab = left_pad([[IGNORE] * P + lab for lab in labels], IGNORE, S).to(embeds.device)  # (B, S)
    targets = lab[:, 1:]  # (B, S-1): position t predicts token t+1
    sel = targets != IGNORE  # (B, S-1)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, :-1][sel]  # (N, V)
    loss_sum = F.cross_entropy(logits.float(), targets[sel], reduction="sum")
    return loss_sum, int(sel.sum())


def greedy(
    model, prompts: torch.Tensor, seqs: list[list[int]], pad_id: int, eos_id: int, max_new: int, which=None
) -> list[list[int]]:
    """Greedy decoding behind the soft prompts, with a KV cache; each row stops at eos (not included)."""
    return decode_or_score(model, prompts, seqs, pad_id, eos_id, which=which, max_new=max_new)[0]


def tune(project, tag: str, cfg, reporter, **options):
    """Tune one tag: `train.tune_many` with a single entry, its one TuneResult."""
    from ptcli.tuning.tune import tune_many

    return tune_many(project, {tag: cfg}, reporter, **options)[0]
