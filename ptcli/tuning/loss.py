"""The loss of one step's rows: the gold answer's LM loss, or cross-entropy over the answer set's scores.

--loss answer     each row's answer tokens (the seed's loss; with --full-text-loss the text's too)
--loss choices    each row runs once per candidate of its tag's answer set; a candidate's score is
                  the summed log-likelihood of its tokens (what --mode rank picks by), and the loss
                  is the cross-entropy of those scores against the gold answer (T-Few's, without its
                  unlikelihood term). Training then optimises what validation and infer rank by.

A prompt that enters at block 0 runs its rows through the whole base (forward.labelled_hidden).
One that enters at block K > 0 runs them from their states entering block K, computed once
a row and kept (states.py), through the blocks above K only (above.hidden_above).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptcli.enums import Loss
from ptcli.lm.above import hidden_above
from ptcli.lm.batch import IGNORE, to_logits
from ptcli.lm.forward import labelled_hidden
from ptcli.lm.frozen import first_rows
from ptcli.lm.placed import first_slots, has_slots
from ptcli.tuning.states import FrozenStates
from ptcli.tuning.task import Task


@dataclass
class StepRows:
    """The rows one step runs: the rows of the picks, or each pick once per candidate."""

    seqs: list[list[int]]
    labels: list[list[int]]
    which: list[int]  # the prompt slot each row trains
    keys: list[tuple]  # (tag, row[, candidate]): what FrozenStates keeps them by
    example: list[int]  # the pick each row belongs to
    gold: list[int]  # --loss choices: the gold candidate of each pick


def candidate_rows(
    context: list[int], candidates: list[list[int]], key: tuple
) -> list[tuple[list[int], list[int], tuple]]:
    """(row, labels, key) of `context` followed by each candidate, only the candidate's tokens labelled."""
    return [(context + c, [IGNORE] * len(context) + c, (*key, n)) for n, c in enumerate(candidates)]


def step_rows(picks: list[tuple[Task, int, int]], loss: str) -> StepRows:
    """picks: (task, row, member) of this process's share of the step's batch."""
    out = StepRows([], [], [], [], [], [])
    for b, (t, i, k) in enumerate(picks):
        rows: list[tuple[list[int], list[int], tuple]]
        if loss == Loss.ANSWER:
            rows = [(t.train.ids[i], t.train.labels[i], (t.tag, i))]
        else:
            assert t.candidates is not None and t.choices is not None  # make_tasks refuses --loss choices otherwise
            rows = candidate_rows(t.train.prompts[i], t.candidates, (t.tag, i))
            out.gold.append(t.choices.index(t.train.answers[i].strip()))
        for seq, labels, key in rows:
            out.seqs.append(seq)
            out.labels.append(labels)
            out.keys.append(key)
            out.which.append(t.slots[k])
            out.example.append(b)
    return out


def _explicit(seq: list[int], labels: list[int], P: int) -> tuple[list[int], list[int]]:
    """A prefix-layout row carries its prompt implicitly in front; from block K the row is run whole."""
    if has_slots([seq]):
        return seq, labels
    return [-(j + 1) for j in range(P)] + seq, [IGNORE] * P + labels


def labelled(
    model, prompts: torch.Tensor, rows: StepRows, pad_id: int, states: FrozenStates | None, layer: int, depth: int
):
    """The final hidden state that predicts each labelled token of `rows`, the token, and its row: (N, H), (N,), (N,).

    With kept `states` a late prompt's rows run from block `layer` up (the texts of the suffix
    layout kept as keys and values); without, through the whole base.
    """
    if not (layer and states is not None):  # the whole base (a sharded stack must run every block)
        return labelled_hidden(model, prompts, rows.seqs, rows.labels, pad_id, rows.which)
    whole = [_explicit(s, lab, prompts.shape[-2] // depth) for s, lab in zip(rows.seqs, rows.labels)]
    seqs, labels = [s for s, _ in whole], [lab for _, lab in whole]
    cut = first_slots(seqs)
    texts = None
    if min(cut) > 0:  # the prompt after the text: kept texts never run again
        below, texts = states.split(rows.keys, rows.example, seqs, cut)
    else:
        below = states.get(rows.keys, seqs)
    return hidden_above(model, layer, prompts, below, seqs, labels, rows.which, rows.example, depth, texts)


def batch_loss(
    model,
    prompts: torch.Tensor,
    rows: StepRows,
    loss: str,
    pad_id: int,
    states: FrozenStates | None,
    layer: int,
    depth: int = 1,
) -> tuple[torch.Tensor, int]:
    """(summed loss, count): labelled tokens for --loss answer, picks for --loss choices. prompts: (S, D*P, H).

    Called inside `entering(model, layer, depth)`. With kept `states` a late prompt's rows run
    from block `layer` up; without, through the whole base.
    """
    h, t, row_of = labelled(model, prompts, rows, pad_id, states, layer, depth)
    logp = -F.cross_entropy(to_logits(model, h).float(), t, reduction="none")  # (N,)
    if loss == Loss.ANSWER:
        return -logp.sum(), int(logp.numel())
    per_row = torch.zeros(len(rows.seqs), device=logp.device).index_add(0, row_of, logp)  # (R,) candidates' scores
    B = len(rows.gold)
    C = max(rows.example.count(b) for b in range(B))
    scores = torch.full((B, C), float("-inf"), device=logp.device)  # (B, C): tags' answer sets may differ in size
    first = first_rows(rows.example)
    column = [r - first[e] for r, e in enumerate(rows.example)]  # an example's candidates are consecutive rows
    scores = scores.index_put((torch.tensor(rows.example), torch.tensor(column)), per_row)
    return F.cross_entropy(scores, torch.tensor(rows.gold, device=logp.device), reduction="sum"), B
