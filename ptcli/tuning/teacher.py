"""distill's teacher: the frozen base with a long text where the tag's prompt goes, asked once per row.

The teacher text's token embeddings stand where the soft prompt's vectors stand, so the teacher
runs on the very path the student runs on (the shared-prompt fast path, templates and all): a
student whose prompt is the teacher text's embeddings *is* the teacher. For each row the teacher
answers greedily, or sampled with --temperature T > 0 (up to --max-new-tokens, then end of sequence
when it stops; validation rows are always answered greedily, as agreement is scored) and its next-token
distribution at each of those positions is kept: the `top_k` likeliest tokens and the probability
left outside them, or the whole vocabulary with --top-k 0. The student is trained on the KL
divergence between those distributions, bucketed alike (`kl`): the top k tokens and one bucket for
the rest, which is 0 exactly when the two distributions agree there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptcli.lm.answers import run_rows
from ptcli.lm.batch import IGNORE, to_logits
from ptcli.lm.forward import labelled_hidden


@dataclass
class Said:
    """What the teacher said after one row: its continuation, the answer text, its distributions along it."""

    targets: list[int]  # its tokens (greedy, or sampled), then eos when the teacher stopped within --max-new-tokens
    text: str  # those tokens decoded and stripped: greedy, the answer `ptcli infer` would give
    ids: torch.Tensor | None  # (n, k) the top-k token ids at each target position; None: the whole vocabulary
    logp: torch.Tensor  # (n, k) their log-probabilities (n, V with the whole vocabulary)
    rest: torch.Tensor  # (n,) log-probability outside the top k (-inf with the whole vocabulary)


def teacher_ids(tok, text: str) -> list[int]:
    """The teacher text's tokens, tokenized as --init text tokenizes an init text (so a student of that length
    starts as the teacher)."""
    return tok(text, add_special_tokens=False).input_ids


@torch.no_grad()
def teacher_prompt(model, ids: list[int]) -> torch.Tensor:
    """(P_t, H) float32: the teacher text's input embeddings as the base makes them (a family that scales its
    embeddings, such as Gemma, does it in the embedding module), in the soft prompt's place."""
    emb = model.get_input_embeddings()
    return emb(torch.tensor(ids, device=emb.weight.device)).float()


def topk(logp: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(ids, their log-probs, log of the rest) of log-probabilities (N, V); k = 0 keeps the whole vocabulary."""
    if k == 0 or k >= logp.shape[-1]:
        return None, logp, torch.full(logp.shape[:1], float("-inf"), device=logp.device)
    top, ids = logp.topk(k, dim=-1)  # (N, k), (N, k)
    rest = logp.scatter(1, ids, float("-inf")).logsumexp(-1)  # (N,)
    return ids, top, rest


def kl(student: torch.Tensor, ids: torch.Tensor | None, logp: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position (N,), over the teacher's top-k tokens and one bucket for the rest.

    student: (N, V) log-probabilities; ids, logp, rest: the teacher's (`topk`).
    """
    q = student if ids is None else student.gather(1, ids)  # (N, k)
    p = logp.exp()
    out = (p * (logp - q)).sum(-1)  # (N,)
    if ids is not None:
        q_rest = student.scatter(1, ids, float("-inf")).logsumexp(-1)  # (N,)
        p_rest = rest.exp()
        out = out + torch.where(p_rest > 0, p_rest * (rest - q_rest), torch.zeros_like(p_rest))
    return out


def said_logprobs(
    model, prompts: torch.Tensor, contexts: list[list[int]], targets: list[list[int]], pad_id: int, which=None
) -> torch.Tensor:
    """Log-probabilities (N, V) at every target position of every row (rows in order, positions in order)."""
    seqs = [c + t for c, t in zip(contexts, targets)]
    labels = [[IGNORE] * len(c) + t for c, t in zip(contexts, targets)]
    h, _, _ = labelled_hidden(model, prompts, seqs, labels, pad_id, which)  # (N, H)
    return to_logits(model, h).float().log_softmax(-1)  # (N, V)


@torch.no_grad()
def ask(
    model,
    tok,
    prompt: torch.Tensor,
    contexts: list[list[int]],
    max_new: int,
    k: int,
    batch_size: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[Said]:
    """The teacher's answer and distributions after every row; prompt: (P_t, H), contexts laid out for it.

    temperature > 0 samples the answers (softmax of logits / temperature) instead of taking the greedy
    ones, from a generator seeded by `seed` and the batch, so the same rows get the same answers again.
    """
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))  # similar lengths together
    out: list[Said | None] = [None] * len(contexts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = [contexts[i] for i in idx]
        pick = _sampler(temperature, seed + s, prompt.device) if temperature > 0 else None
        said = run_rows(model, tok, [prompt], batch, [0] * len(idx), max_new=max_new, pick=pick)
        assert said.tokens is not None and said.texts is not None  # max_new >= 1
        targets = [t[0] + [tok.eos_token_id] * (len(t[0]) < max_new) for t in said.tokens]
        logp = said_logprobs(model, prompt, batch, targets, tok.pad_token_id)  # (N, V)
        ids, top, rest = topk(logp, k)
        at = 0
        for i, t, text in zip(idx, targets, said.texts):
            n = len(t)
            out[i] = Said(
                t,
                text[0],
                None if ids is None else ids[at : at + n].cpu(),
                top[at : at + n].cpu(),
                rest[at : at + n].cpu(),
            )
            at += n
    return [s for s in out if s is not None]


def _sampler(temperature: float, seed: int, device):
    """pick(logits (B, V)) -> (B,): one token per row from softmax(logits / temperature), reproducibly."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = (logits.float() / temperature).softmax(-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)

    return pick
