"""Validation during tuning: one pass over a tag's validation rows gives its loss and both accuracies.

The kept prompt is the one with the best accuracy (ranked, where the task has an answer set),
ties going to the lower loss. Every process scores its share of the rows and the totals are
reduced, so N processes agree with one.

A late prompt over a closed answer set validates from its rows' kept states (`evaluate_kept`):
the rows' states below its block, and the suffix layout's texts, are computed at the first
validation and reused at every later one, as training reuses its rows'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptcli.data.encode import Encoded
from ptcli.lm.answers import run_rows
from ptcli.lm.batch import to_logits
from ptcli.lm.forward import lm_loss
from ptcli.lm.rules import ranked, vote
from ptcli.project.record import headline
from ptcli.tuning.loss import StepRows, candidate_rows, labelled
from ptcli.tuning.states import FrozenStates
from ptcli.tuning.task import Task


def evaluate(model, tok, prompts: torch.Tensor, task: Task, batch_size: int, acc) -> dict[str, float]:
    """Loss per token (all members), and the accuracy of the combined answers, over all processes.

    val_acc scores greedy answers; val_acc_rank (tasks with a closed answer set) the
    best-scoring candidate. Both come from one pass over the texts; so does the loss when
    it covers the answer only and every answer is a candidate. prompts: (K, P, H).
    """
    enc, K, choices = task.valid, prompts.shape[0], task.choices or []
    batches = batches_of(enc, batch_size, acc)
    max_new = max(
        len(ids) - len(text) for ids, text in zip(enc.ids, enc.prompts)
    )  # longest answer + eos, already tokenized
    loss_from_scores = scores_give_loss(task)
    loss_sum, count, correct, right = 0.0, 0, 0, 0
    agree = (lambda flag: agreed(acc, flag, "min")) if acc.num_processes > 1 else None
    with torch.no_grad():
        for idx in batches:
            if not idx:
                run_rows(model, tok, [prompts], [enc.prompts[0]], [0], max_new=max_new, choices=choices, agree=agree)
                if not loss_from_scores:
                    lm_loss(model, prompts, enc.ids[:1], enc.labels[:1], tok.pad_token_id)
                continue
            truth = [enc.answers[i].strip() for i in idx]
            out = run_rows(
                model,
                tok,
                [prompts],
                [enc.prompts[i] for i in idx],
                [0] * len(idx),
                max_new=max_new,
                choices=choices,
                agree=agree,
            )
            assert out.texts is not None  # max_new >= 1: every row has an answer and eos
            correct += sum(texts[vote(texts)] == a for texts, a in zip(out.texts, truth))
            if out.scores is not None:
                right += sum(choices[ranked(s)] == a for s, a in zip(out.scores, truth))
            if loss_from_scores and out.scores is not None:
                picked = torch.tensor([choices.index(enc.answers[i]) for i in idx])  # (B,)
                scores = torch.stack(out.scores)  # (B, K, C)
                loss_sum -= float(scores[torch.arange(len(idx)), :, picked].sum())  # (B, K) true-answer log-likelihoods
                count += K * sum(len(enc.ids[i]) - len(enc.prompts[i]) for i in idx)
            else:
                rows = [i for i in idx for _ in range(K)]
                s, n = lm_loss(
                    model,
                    prompts,
                    [enc.ids[i] for i in rows],
                    [enc.labels[i] for i in rows],
                    tok.pad_token_id,
                    which=list(range(K)) * len(idx),
                )
                loss_sum, count = loss_sum + float(s), count + n
    totals = acc.reduce(torch.tensor([loss_sum, count, correct, right], dtype=torch.float64, device=acc.device), "sum")
    loss_sum, count, correct, right = totals.tolist()
    metrics = {"val_loss": loss_sum / max(count, 1), "val_acc": correct / len(enc.ids)}
    if choices:
        metrics["val_acc_rank"] = right / len(enc.ids)
    return metrics


def scores_give_loss(task: Task) -> bool:
    """Whether the candidates' scores hold the validation loss: a closed answer set holding every validation
    answer, and the loss on the answer only."""
    choices = task.choices or []
    return bool(choices) and task.cfg.answer_only and all(a in choices for a in task.valid.answers)


def keeps_states(task: Task, prompts: torch.Tensor) -> bool:
    """Whether `evaluate_kept` gives this tag's metrics: one prompt (no ensemble) whose scores hold the loss."""
    return prompts.shape[0] == 1 and scores_give_loss(task)


def evaluate_kept(
    model, prompts: torch.Tensor, task: Task, states: FrozenStates, layer: int, depth: int, batch_size: int, acc
) -> dict[str, float]:
    """`evaluate`'s metrics of a late prompt (1, D*P, H), each row run from its kept states above block `layer`.

    Called inside `entering(model, layer, depth)`, where `keeps_states` holds. Every row runs
    once per candidate, teacher-forced, as --loss choices trains: val_acc_rank and val_loss are
    evaluate's numbers (the candidates' summed log-likelihoods), and val_acc counts the rows
    whose gold answer is the argmax at each of its tokens, eos included, which is when greedy
    decoding writes it (one difference: a greedy answer that spells the gold text in other
    tokens counts in evaluate and not here).
    """
    enc, choices, candidates = task.valid, task.choices or [], task.candidates or []
    C = len(candidates)
    loss_sum, count, correct, right = 0.0, 0, 0, 0
    with torch.no_grad():
        for idx in [b for b in batches_of(enc, batch_size, acc) if b]:  # no collective forward: the base is whole
            rows = StepRows([], [], [], [], [], [])
            for b, i in enumerate(idx):  # key[:2] names the row's text, as for training rows
                for seq, labels, key in candidate_rows(enc.prompts[i], candidates, ((task.tag, "valid"), i)):
                    rows.seqs.append(seq)
                    rows.labels.append(labels)
                    rows.keys.append(key)
                    rows.which.append(0)
                    rows.example.append(b)
            h, t, row_of = labelled(model, prompts, rows, 0, states, layer, depth)
            logits = to_logits(model, h).float()  # (N, V)
            R = len(rows.seqs)
            logp = -F.cross_entropy(logits, t, reduction="none")  # (N,)
            scores = torch.zeros(R, device=logp.device).index_add(0, row_of, logp).view(len(idx), C)  # (B, C)
            missed = torch.zeros(R, device=logp.device).index_add(0, row_of, (logits.argmax(-1) != t).float())
            gold = torch.tensor([choices.index(enc.answers[i].strip()) for i in idx], device=logp.device)  # (B,)
            picked = torch.arange(len(idx), device=logp.device)
            right += int((scores.argmax(-1) == gold).sum())
            correct += int((missed.view(len(idx), C)[picked, gold] == 0).sum())
            loss_sum -= float(scores[picked, gold].sum())
            count += sum(len(enc.ids[i]) - len(enc.prompts[i]) for i in idx)
    totals = acc.reduce(torch.tensor([loss_sum, count, correct, right], dtype=torch.float64, device=acc.device), "sum")
    loss_sum, count, correct, right = totals.tolist()
    n = len(enc.ids)
    return {"val_loss": loss_sum / max(count, 1), "val_acc": correct / n, "val_acc_rank": right / n}


def batches_of(enc: Encoded, batch_size: int, acc) -> list[list[int]]:
    """This process's share of the rows in batches of similar lengths; as many batches on every process."""
    shard = list(range(acc.process_index, len(enc.ids), acc.num_processes))
    shard.sort(key=lambda i: len(enc.ids[i]))  # similar lengths together: less padding
    batches = [shard[s : s + batch_size] for s in range(0, len(shard), batch_size)]
    if acc.num_processes > 1:  # every process makes the same calls (a sharded base's forward is collective)
        most = int(acc.reduce(torch.tensor(len(batches), device=acc.device), "max"))
        batches += [[]] * (most - len(batches))  # an empty batch runs one row and counts nothing
    return batches


def better(new: dict[str, float], best: dict[str, float] | None) -> bool:
    """Higher accuracy wins (ranked, where the task has an answer set); equal accuracy goes to lower loss."""

    def key(m: dict[str, float]) -> tuple[float, float]:
        return m[headline(m)], -m["val_loss"]

    return best is None or key(new) > key(best)


def agreed(acc, flag: bool, how: str = "max") -> bool:
    """A decision every process takes together: any of them ("max"), or all of them ("min")."""
    if acc.num_processes == 1:
        return flag
    flags = acc.gather(torch.tensor([float(flag)], device=acc.device))  # (world,)
    return bool(flags.max() if how == "max" else flags.min())
