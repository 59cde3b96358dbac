"""Running the frozen base behind soft prompts: training loss, greedy answers, ranked choices.

Every function takes a stack of prompts (K, P, H) and `which` (B,), the prompt each row
uses: one tag's prompt (K=1), the members of an ensemble, or the prompts of several tags in
one mixed batch. A single prompt (P, H) is the same as K=1.

The fast path (`prefixed`) runs each prompt once per batch and shares its key/value cache
with the rows that use it: in a causal LM a prompt's activations do not depend on what
follows. Layout per row: [prompt (P)][pad ...][tokens], pads masked out, token positions
continuing from P. `assemble` is the plain layout [pad ...][prompt][tokens] that runs every
row in full; it is kept so tests can hold the fast path to it.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F

IGNORE = -100


def stack(prompts: torch.Tensor, rows: int, which: torch.Tensor | list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
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


def to_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary projection of hidden states (..., H) -> (..., V), with the model's logit soft-capping if any."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def prefixed(model, prompts: torch.Tensor, seqs: list[list[int]], pad_id: int, which=None):
    """Run each prompt once and share its cache with the rows that use it: the fast path.

    Gradients reach the prompts through the cache. Returns the body's output over the tokens
    (B, T, H), each row's prompt-end hidden state (B, H), the attention mask (B, P+T) and
    the token positions (B, T).
    """
    prompts, which = stack(prompts, len(seqs), which)
    K, P, _ = prompts.shape
    B = len(seqs)
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    which = which.to(device)
    head = model.base_model(
        inputs_embeds=prompts.to(device=device, dtype=dtype),  # (K, P, H)
        position_ids=torch.arange(P, device=device).expand(K, P),
        use_cache=True,
    )
    cache = _cache_of(head)
    if K == 1:
        cache.batch_repeat_interleave(B)  # (1, ...) -> (B, ...)
    else:
        cache.batch_select_indices(which)  # (K, ...) -> (B, ...)
    ids = left_pad(seqs, pad_id).to(device)  # (B, T)
    tok_mask = left_pad([[1] * len(s) for s in seqs], 0, ids.shape[1]).to(device)  # (B, T)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long, device=device), tok_mask], dim=1)  # (B, P+T)
    pos = P + (tok_mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **_with_cache(model, cache))
    return out, head.last_hidden_state[:, -1][which], mask, pos


def token_logprobs(model, prompts: torch.Tensor, seqs: list[list[int]], labels: list[list[int]], pad_id: int, which=None):
    """Log-probability of every labelled token, and the row it belongs to: (N,), (N,).

    labels[i] is aligned with seqs[i] (IGNORE where nothing is scored). The vocabulary
    projection runs only at the positions that predict a labelled token.
    """
    if has_slots(seqs):
        return _placed_logprobs(model, prompts, seqs, labels, pad_id, which)
    P = prompts.shape[-2]
    out, last_prompt, mask, _ = prefixed(model, prompts, seqs, pad_id, which)
    hidden = out.last_hidden_state  # (B, T, H)
    lab = left_pad(labels, IGNORE).to(hidden.device)  # (B, T)
    targets = lab[:, 1:]  # (B, T-1): token t predicts token t+1
    sel = (targets != IGNORE) & mask[:, P:-1].bool()  # a pad predicts nothing
    firsts = torch.tensor([row[0] for row in labels], device=hidden.device)  # (B,): predicted by the prompt's end
    first_sel = firsts != IGNORE
    h = torch.cat([hidden[:, :-1][sel], last_prompt[first_sel]])  # (N, H)
    t = torch.cat([targets[sel], firsts[first_sel]])  # (N,)
    rows = torch.arange(len(seqs), device=hidden.device)
    row_of = torch.cat([rows.unsqueeze(1).expand_as(sel)[sel], rows[first_sel]])  # (N,)
    logp = -F.cross_entropy(to_logits(model, h).float(), t, reduction="none")  # (N,)
    return logp, row_of


def has_slots(seqs: list[list[int]]) -> bool:
    """Rows laid out by a template write prompt vector j as -(j+1) among their tokens (see template.py)."""
    return any(t < 0 for s in seqs for t in s)


def right_pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    """(B, width) long tensor, each row left-aligned."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def placed(model, prompts: torch.Tensor, seqs: list[list[int]], pad_id: int, which=None, *, train: bool):
    """Rows whose prompt vectors sit among their tokens (a template other than the prefix).

    What comes before a row's first prompt vector cannot depend on any prompt (the LM is
    causal): it runs without gradient as [pads][pre], and the rest of the row [post]
    continues from its cache, so only the prompt and what follows it are back-propagated.
    In training the posts are right-padded ([pads][pre][post][pads]); in inference rows must
    end together, so posts of unequal length run as one left-padded pass. Either way no pad
    sits between two real positions (sliding windows see true distances).
    Returns the body's output over the posts (B, T2, H), the mask (B, T1+T2) and the post
    positions (B, T2).
    """
    prompts, which = stack(prompts, len(seqs), which)
    emb = model.get_input_embeddings()
    device = emb.weight.device
    cut = [next(i for i, t in enumerate(s) if t < 0) for s in seqs]  # first prompt vector of each row
    if not train and len({len(s) - c for s, c in zip(seqs, cut)}) > 1:
        cut = [0] * len(seqs)
    pre_mask = left_pad([[1] * c for c in cut], 0, max(cut)).to(device)  # (B, T1)
    cache_arg = {}
    if max(cut):
        with torch.no_grad():
            pre = model.base_model(input_ids=left_pad([s[:c] for s, c in zip(seqs, cut)], pad_id).to(device),
                                   attention_mask=pre_mask, position_ids=(pre_mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        cache_arg = _with_cache(model, _cache_of(pre))
    posts = [s[c:] for s, c in zip(seqs, cut)]
    pad = right_pad if train else left_pad
    ids = pad(posts, pad_id).to(device)  # (B, T2); prompt vector j is -(j+1)
    real = pad([[1] * len(p) for p in posts], 0).to(device)  # (B, T2)
    is_prompt = ids < 0  # (B, T2)
    rows = prompts.to(device=device, dtype=emb.weight.dtype)[which.to(device)]  # (B, P, H)
    slot = (-ids - 1).clamp(min=0)  # (B, T2): which prompt vector sits here
    prompt_embeds = torch.gather(rows, 1, slot.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))  # (B, T2, H)
    embeds = torch.where(is_prompt.unsqueeze(-1), prompt_embeds, emb(ids.clamp(min=0)))  # (B, T2, H)
    mask = torch.cat([pre_mask, real], dim=1)  # (B, T1+T2)
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, pre_mask.shape[1]:]  # (B, T2)
    out = model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, **cache_arg)
    return out, mask, pos


def _placed_logprobs(model, prompts, seqs, labels, pad_id, which):
    """token_logprobs for template rows: labels sit in the posts (nothing before a prompt vector is scored)."""
    out, _, _ = placed(model, prompts, seqs, pad_id, which, train=True)
    cut = [next(i for i, t in enumerate(s) if t < 0) for s in seqs]
    hidden = out.last_hidden_state  # (B, T2, H)
    lab = right_pad([lab[c:] for lab, c in zip(labels, cut)], IGNORE).to(hidden.device)  # (B, T2)
    sel = lab[:, 1:] != IGNORE  # (B, T2-1): position t predicts token t+1
    rows = torch.arange(len(seqs), device=hidden.device).unsqueeze(1).expand_as(sel)[sel]  # (N,)
    logp = -F.cross_entropy(to_logits(model, hidden[:, :-1][sel]).float(), lab[:, 1:][sel], reduction="none")  # (N,)
    return logp, rows


def lm_loss(model, prompts: torch.Tensor, seqs: list[list[int]], labels: list[list[int]], pad_id: int, which=None, fast: bool = True):
    """Summed cross entropy over labelled tokens, and their count.

    The plain path runs every row in full and computes logits everywhere (kept to test that
    both agree).
    """
    if fast:
        logp, _ = token_logprobs(model, prompts, seqs, labels, pad_id, which)
        return -logp.sum(), int(logp.numel())
    P = prompts.shape[-2]
    embeds, mask, pos = assemble(model, prompts, seqs, pad_id, which)  # (B, S, H), (B, S), (B, S)
    S = embeds.shape[1]
    lab = left_pad([[IGNORE] * P + lab for lab in labels], IGNORE, S).to(embeds.device)  # (B, S)
    targets = lab[:, 1:]  # (B, S-1): position t predicts token t+1
    sel = targets != IGNORE  # (B, S-1)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, :-1][sel]  # (N, V)
    loss_sum = F.cross_entropy(logits.float(), targets[sel], reduction="sum")
    return loss_sum, int(sel.sum())


def _with_cache(model, cache) -> dict:
    """transformers 5 renamed `past_key_values` to `cache` (argument and output); accept both."""
    params = inspect.signature(model.base_model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.no_grad()  # not inference_mode: its tensors would poison a sharded base's gathered weights for training
def answer(model, prompts: torch.Tensor, seqs: list[list[int]], pad_id: int, eos_id: int, *, which=None, max_new: int = 0,
           choices: list[list[int]] | None = None, agree=None) -> tuple[list[list[int]] | None, torch.Tensor | None]:
    """Read each row once, then decode greedily from it, score candidate answers after it, or both.

    Returns (greedy tokens per row, stopping at eos, not included) when max_new > 0, and
    (B, C) summed log-likelihoods of the candidates when choices are given. Candidates are
    token lists as training saw them (answer prefix and end-of-sequence included) and run
    as a short continuation of each row's cache, so ranking C answers costs one pass over
    the texts, not C. `agree(flag)` makes the stop decision common to all processes (a
    sharded base needs every process to make the same calls).
    """
    if has_slots(seqs):
        out, mask, pos = placed(model, prompts, seqs, pad_id, which, train=False)
    else:
        out, _, mask, pos = prefixed(model, prompts, seqs, pad_id, which)
    last = out.last_hidden_state[:, -1]  # (B, H): predicts each row's next token
    cache = _cache_of(out)
    scores = None
    if choices:
        scores = _score_choices(model, copy.deepcopy(cache) if max_new else cache, last, mask, pos, choices, pad_id)
    return (_decode(model, cache, last, mask, pos, eos_id, max_new, agree or bool) if max_new else None), scores


def _score_choices(model, cache, last: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, choices: list[list[int]], pad_id: int):
    B, C = last.shape[0], len(choices)
    first = torch.tensor([c[0] for c in choices], device=last.device)  # (C,)
    scores = to_logits(model, last).float().log_softmax(-1)[:, first]  # (B, C): each candidate's first token
    rest = max(len(c) for c in choices) - 1
    if rest == 0:
        return scores.cpu()
    cache.batch_repeat_interleave(C)  # (B*C, ...): row-major, candidate-minor
    ids = torch.tensor([c + [pad_id] * (rest + 1 - len(c)) for c in choices], device=last.device)  # (C, L), padded on the right
    real = torch.tensor([[1] * len(c) + [0] * (rest + 1 - len(c)) for c in choices], device=last.device)  # (C, L)
    tail = model.base_model(
        input_ids=ids[:, :-1].repeat(B, 1),  # (B*C, L-1): a candidate's tokens predict its next ones
        attention_mask=torch.cat([mask.repeat_interleave(C, 0), real[:, :-1].repeat(B, 1)], dim=1),
        position_ids=pos[:, -1:].repeat_interleave(C, 0) + torch.arange(1, rest + 1, device=last.device),
        use_cache=True,
        **_with_cache(model, cache),
    ).last_hidden_state  # (B*C, L-1, H)
    targets = ids[:, 1:].repeat(B, 1)  # (B*C, L-1)
    keep = real[:, 1:].repeat(B, 1).bool()  # (B*C, L-1): real tokens only
    logp = -F.cross_entropy(to_logits(model, tail[keep]).float(), targets[keep], reduction="none")  # (N,)
    row = torch.arange(B * C, device=last.device).unsqueeze(1).expand_as(keep)[keep]  # (N,)
    more = torch.zeros(B * C, device=last.device).index_add_(0, row, logp)  # (B*C,)
    return (scores + more.view(B, C)).cpu()


def _decode(model, cache, last: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, eos_id: int, max_new: int, agree) -> list[list[int]]:
    B = last.shape[0]
    results: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=mask.device)
    for step in range(max_new):
        nxt = to_logits(model, last).argmax(-1)  # (B,)
        done |= nxt == eos_id
        for i in (~done).nonzero().flatten().tolist():
            results[i].append(int(nxt[i]))
        if agree(bool(done.all())) or step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)  # (B, S+step+1)
        pos = pos[:, -1:] + 1  # (B, 1)
        out = model.base_model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos, use_cache=True, **_with_cache(model, cache))
        last, cache = out.last_hidden_state[:, -1], _cache_of(out)
    return results


def greedy(model, prompts: torch.Tensor, seqs: list[list[int]], pad_id: int, eos_id: int, max_new: int, which=None) -> list[list[int]]:
    """Greedy decoding behind the soft prompts, with a KV cache; each row stops at eos (not included)."""
    return answer(model, prompts, seqs, pad_id, eos_id, which=which, max_new=max_new)[0]


def choice_scores(model, prompts: torch.Tensor, seqs: list[list[int]], choices: list[list[int]], pad_id: int, which=None) -> torch.Tensor:
    """Summed log-likelihood of each candidate answer after each row: (B, C)."""
    return answer(model, prompts, seqs, pad_id, pad_id, which=which, choices=choices)[1]
