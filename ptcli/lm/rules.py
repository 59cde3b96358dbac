"""The answer rules, written once: `ptcli infer` (either engine), the server and tuning's validation all
answer by these. Nothing here needs torch: the llama.cpp engine answers by them with numpy arrays.

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

answers.py runs the torch base to get those tokens and scores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ptcli.data.encode import answer_tokens
from ptcli.data.template import Layout
from ptcli.enums import Mode
from ptcli.errors import UsageError

CONTENT_FREE = ("N/A",)  # Zhao et al. (2021)'s content-free input, in place of the text


@dataclass(frozen=True)
class Step:
    """One greedy step: the token, its log-probability, and the likeliest tokens there (id, log-prob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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


def vote(texts: list[str]) -> int:
    """The member whose greedy answer most members give; ties go to the first member."""
    return texts.index(Counter(texts).most_common(1)[0][0])


def means(scores, bias=None):
    """The members' mean score of each candidate (K, C) -> (C,), after calibration (`bias`, (K, C)).

    Scores and bias are torch tensors or numpy arrays, both alike."""
    return (scores if bias is None else scores - bias).mean(0)


def ranked(scores, bias=None) -> int:
    """The candidate with the best members' mean score (K, C), after calibration (`bias`, (K, C))."""
    return int(means(scores, bias).argmax())


def calibration_bias(content_free: np.ndarray) -> np.ndarray:
    """Contextual calibration's bias: (N, ..., C) answer scores after N content-free inputs -> (..., C), float32.

    The log of the answer-set distribution the content-free inputs give, averaged over them.
    Subtracting it from a row's log-likelihoods is Zhao et al.'s diagonal W = diag(p_cf)^-1 in
    log space: an answer the prompt favours whatever the text loses that edge.
    """
    z = np.asarray(content_free, dtype=np.float32)
    p = np.exp(z - z.max(-1, keepdims=True))
    return np.log((p / p.sum(-1, keepdims=True)).mean(0))
