"""Running rows laid out by a template: prompt vectors among the tokens (template.py writes vector j as -(j+1)).

What comes before a row's first prompt vector cannot depend on any prompt (the LM is causal):
it runs once, without gradient, as [pads][pre], and the rest of the row [post] continues from
its cache, so training back-propagates only through the prompt and what follows it. In
training the posts are right-padded ([pads][pre][post][pads]); in inference rows must end
together, so posts of unequal length run whole in one left-padded pass. Either way no pad
sits between two real positions, so a sliding window sees true distances, and the cache is
a full one (a window's own cache would drop slots the posts still need to line up with).
"""

from __future__ import annotations

import torch

from ptcli.lm.arch import window_of
from ptcli.lm.batch import IGNORE, Read, cache_of, left_pad, right_pad, stack, with_cache
from ptcli.lm.depth import forward_with


def has_slots(seqs: list[list[int]]) -> bool:
    """Rows laid out by a template other than the prefix carry their prompt vectors as negative ids."""
    return any(t < 0 for s in seqs for t in s)


def first_slots(seqs: list[list[int]]) -> list[int]:
    """Where each template row's first prompt vector sits: all before it is text no prompt reaches."""
    return [next(i for i, t in enumerate(s) if t < 0) for s in seqs]  # each row's first prompt vector


def placed_read(model, prompts: torch.Tensor, seqs: list[list[int]], pad_id: int, which=None, *, train: bool) -> Read:
    """Read template rows behind their prompts (K, P, H); hidden (B, T2, H) covers the posts only."""
    prompts, which = stack(prompts, len(seqs), which)
    emb = model.get_input_embeddings()
    device = emb.weight.device
    cut = first_slots(seqs)
    if not train and len({len(s) - c for s, c in zip(seqs, cut)}) > 1:
        cut = [0] * len(seqs)
    pre_mask = left_pad([[1] * c for c in cut], 0, max(cut)).to(device)  # (B, T1)
    cache = None
    if window_of(model) is not None:
        from transformers import DynamicCache

        cache = DynamicCache()
    cache_arg = with_cache(model, cache)
    if max(cut):
        with torch.no_grad():
            pre = model.base_model(
                input_ids=left_pad([s[:c] for s, c in zip(seqs, cut)], pad_id).to(device),
                attention_mask=pre_mask,
                position_ids=(pre_mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True,
                **cache_arg,
            )
        cache_arg = with_cache(model, cache_of(pre))
    posts = [s[c:] for s, c in zip(seqs, cut)]
    pad = right_pad if train else left_pad
    ids = pad(posts, pad_id).to(device)  # (B, T2); prompt vector j is -(j+1)
    real = pad([[1] * len(p) for p in posts], 0).to(device)  # (B, T2)
    rows = prompts.to(device=device, dtype=emb.weight.dtype)[which.to(device)]  # (B, D*P, H)
    slot = torch.where(ids < 0, -ids - 1, -1)  # (B, T2): which prompt vector sits here (-1: a token)
    mask = torch.cat([pre_mask, real], dim=1)  # (B, T1+T2)
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, pre_mask.shape[1] :]  # (B, T2)
    out = forward_with(
        model,
        emb(ids.clamp(min=0)),
        slot,
        rows,
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        **cache_arg,
    )
    hidden = out.last_hidden_state  # (B, T2, H)
    return Read(hidden, hidden[:, 0], real, mask, pos[:, -1:], cache_of(out))


def placed_hidden(model, prompts, seqs: list[list[int]], labels: list[list[int]], pad_id: int, which=None):
    """`forward.labelled_hidden` for template rows: (N, H), (N,), (N,). Labels sit in the posts."""
    r = placed_read(model, prompts, seqs, pad_id, which, train=True)
    lab = right_pad([lab[c:] for lab, c in zip(labels, first_slots(seqs))], IGNORE).to(r.hidden.device)  # (B, T2)
    sel = lab[:, 1:] != IGNORE  # (B, T2-1): position t predicts token t+1
    rows = torch.arange(len(seqs), device=r.hidden.device).unsqueeze(1).expand_as(sel)[sel]  # (N,)
    return r.hidden[:, :-1][sel], lab[:, 1:][sel], rows
