"""The torch base's answers to rows by the rules of rules.py: greedy tokens and ranked scores, in one pass.

One pass (`run_rows`) serves rows of several prompts (tags, and each tag's members): every
prompt of the pass is stacked into one (M, P, H) tensor and each row points at its members.
Contextual calibration's content-free scores (`content_free_bias`) come from the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptcli.data.encode import answer_tokens
from ptcli.data.template import Layout
from ptcli.lm import rules
from ptcli.lm.forward import decode_or_score
from ptcli.lm.rules import CONTENT_FREE, Step


@dataclass
class Outputs:
    """What one pass gives, per row and member: greedy tokens and their text, candidates' scores."""

    tokens: list[list[list[int]]] | None  # [row][member]: greedy tokens, eos excluded (when max_new > 0)
    texts: list[list[str]] | None  # [row][member]: those tokens decoded and stripped
    scores: list[torch.Tensor] | None  # [row]: (K, C) summed log-likelihoods of the candidates (when given)
    steps: list[list[list[Step]]] | None = None  # [row][member]: each greedy token's log-probability (when `top`)


def run_rows(
    model,
    tok,
    prompts: list[torch.Tensor],
    seqs: list[list[int]],
    owner: list[int],
    *,
    max_new: int = 0,
    choices: list[str] | None = None,
    agree=None,
    top: int | None = None,
    pick=None,
) -> Outputs:
    """One pass: row i runs behind every member of prompts[owner[i]] ((K, P, H) or (P, H)).

    `agree(flag)` makes the decoding's stop decision common to all processes (a sharded base);
    `top` asks for the greedy tokens' log-probabilities and the `top` likeliest tokens at each step;
    `pick` chooses each next token from the logits in place of the argmax (forward.decode_or_score).
    """
    stacks = [p if p.dim() == 3 else p.unsqueeze(0) for p in prompts]  # each (K_j, P, H)
    first = [sum(len(s) for s in stacks[:j]) for j in range(len(stacks))]  # each prompt's first slot in the stack
    rows: list[list[int]] = []
    which: list[int] = []
    spans: list[range] = []  # row i's members among the expanded rows
    for s, j in zip(seqs, owner):
        K = stacks[j].shape[0]
        spans.append(range(len(rows), len(rows) + K))
        rows += [s] * K  # member-minor
        which += [first[j] + k for k in range(K)]
    outs, scores, steps = decode_or_score(
        model,
        torch.cat(stacks),  # (M, P, H)
        rows,
        tok.pad_token_id,
        tok.eos_token_id,
        which=which,
        max_new=max_new,
        choices=answer_tokens(tok, choices) if choices else None,
        agree=agree,
        top=top,
        pick=pick,
    )
    tokens = [[outs[r] for r in span] for span in spans] if outs is not None else None
    texts = [[tok.decode(t, skip_special_tokens=True).strip() for t in row] for row in tokens] if tokens else None
    per_row = [scores[list(span)] for span in spans] if scores is not None else None  # (R, C) -> [(K, C)]
    per_step = [[steps[r] for r in span] for span in spans] if steps is not None else None
    return Outputs(tokens, texts, per_row, per_step)


def calibration_bias(content_free: torch.Tensor) -> torch.Tensor:
    """rules.calibration_bias of torch scores: (N, ..., C) -> (..., C)."""
    bias = rules.calibration_bias(content_free.detach().float().cpu().numpy())
    return torch.from_numpy(bias).to(content_free.device)


def calibrate(scores: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Candidate log-likelihoods (B, ..., C) corrected by the content-free scores (N, ..., C)."""
    return scores - calibration_bias(content_free)


def content_free_bias(model, tok, prompt: torch.Tensor, choices: list[str], layout: Layout) -> torch.Tensor:
    """`calibration_bias` of one tag's prompts (K, P, H) or (P, H) over its answer set: (K, C).

    The content-free rows are laid out as the tag's.
    """
    rows = [layout.context(ids) for ids in tok(list(CONTENT_FREE), add_special_tokens=False).input_ids]
    out = run_rows(model, tok, [prompt], rows, [0] * len(rows), choices=choices)
    assert out.scores is not None  # choices given
    return calibration_bias(torch.stack(out.scores))  # (N, K, C) -> (K, C)
