"""The answer rules, written once: `ptcli infer`, the server and tuning's validation all answer by these.

- Text budget: a row's text is cut from the left so that the prompt, the template's literals,
  the text and what follows it (the generation room, or the longest candidate) fit the tag's
  --max-seq-length.
- Greedy answers: every member of a tag's ensemble decodes; the members vote, ties going to
  the first member.
- Ranked answers: each candidate of the answer set is scored after the row (the summed
  log-likelihood of its tokens as training saw them); the members' scores are averaged,
  optionally calibrated, and the best candidate wins.
- Contextual calibration (Zhao et al., 2021): a candidate the prompt favours whatever the text
  loses that edge, measured after a content-free input laid out as the tag's rows.

One pass (`run_rows`) serves rows of several prompts (tags, and each tag's members): every
prompt of the pass is stacked into one (M, P, H) tensor and each row points at its members.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ptcli.data.encode import answer_tokens
from ptcli.data.template import Layout
from ptcli.enums import Mode
from ptcli.errors import UsageError
from ptcli.lm.batch import Step
from ptcli.lm.forward import decode_or_score

CONTENT_FREE = ("N/A",)  # Zhao et al. (2021)'s content-free input, in place of the text


def room(tok, mode: str, max_new: int, choices: list[str] | tuple[str, ...]) -> int:
    """Positions a row needs after its text: the generation length, or the longest candidate (+ eos)."""
    return max_new if mode == Mode.GENERATE else max(map(len, answer_tokens(tok, list(choices))))


def text_budget(tag: str, max_seq_length: int, layout: Layout, after: int) -> int:
    """`Layout.budget`, refused with the tag's name when no text fits."""
    budget = layout.budget(max_seq_length, after)
    if budget < 1:
        raise UsageError(
            f"the answers ({after} tokens) leave no room for text in {tag!r}'s max sequence length",
            hint="generate fewer tokens (--tokens-to-generate), or give shorter --choices",
        )
    return budget


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


def vote(texts: list[str]) -> int:
    """The member whose greedy answer most members give; ties go to the first member."""
    return texts.index(Counter(texts).most_common(1)[0][0])


def means(scores: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The members' mean score of each candidate (K, C) -> (C,), after calibration (`bias`, (K, C))."""
    return (scores if bias is None else scores - bias).mean(0)


def ranked(scores: torch.Tensor, bias: torch.Tensor | None = None) -> int:
    """The candidate with the best members' mean score (K, C), after calibration (`bias`, (K, C))."""
    return int(means(scores, bias).argmax())


def calibration_bias(content_free: torch.Tensor) -> torch.Tensor:
    """Contextual calibration's bias: (N, ..., C) answer scores after N content-free inputs -> (..., C).

    The log of the answer-set distribution the content-free inputs give, averaged over them.
    Subtracting it from a row's log-likelihoods (`calibrate`) is Zhao et al.'s diagonal
    W = diag(p_cf)^-1 in log space: an answer the prompt favours whatever the text loses that edge.
    """
    return content_free.float().softmax(-1).mean(0).log()


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
