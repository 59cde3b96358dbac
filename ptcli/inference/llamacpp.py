"""`--engine llama.cpp`: the same answers as engine.py, computed by llama.cpp on the base's GGUF file.

llama-cpp-python (the `llamacpp` extra) exposes llama.cpp's batch API, which takes input
embeddings as well as tokens, so a soft prompt goes in as what it is: P vectors at the input.
The layout, text budget, vote and ranking are engine.py's (this engine is an `Engine` whose
`run` is llama.cpp's); only the forward passes differ, and they run on quantized weights, so
an answer can differ from the torch path's where two candidates are nearly tied.

One pass: every member of the pass's prompts is decoded once into a sequence of its own;
each row's sequence starts as a copy of its member's (the unified KV cache shares those
cells, nothing is recomputed); all rows' texts then go in one batch, each token labelled
with its row's sequence id. A template that puts prompt vectors between text pieces decodes
in segments (tokens, then vectors, then tokens), rows side by side. Greedy rows then decode
one token a step; ranked rows copy their sequence once per candidate and score it there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptcli.config import BaseOptions
from ptcli.enums import Mode
from ptcli.errors import PtcliError, UsageError
from ptcli.inference.engine import Engine, Item, Prediction
from ptcli.inference.llama_context import MAX_SEQ, Context, check_engine, check_fingerprint, weights_of
from ptcli.lm.rules import CONTENT_FREE, Step, calibration_bias, means, vote
from ptcli.project.manifest import ProjectDir


def refusal(item: Item) -> UsageError | None:
    """A prompt llama.cpp cannot take as input embeddings, refused by name (never answered by torch instead)."""
    r = item.prompt.record
    if not (r.prompt_layer or r.depth > 1):
        return None
    where = f"before block {r.prompt_layer}" + (" and at every block above" if r.depth > 1 else "")
    return UsageError(
        f"--engine llama.cpp takes prompts at the input embeddings; {item.prompt.tag!r} enters {where}",
        hint="answer it with --engine torch",
    )


@dataclass
class _Seq:
    """One sequence in the cache: a row's member. `pos`: positions filled; `last`: logits after them (V,)."""

    pos: int = 0
    last: np.ndarray | None = None


class LlamaCppEngine(Engine):
    """engine.Engine's answers from llama.cpp: the HF tokenizer (the same token ids), the GGUF weights."""

    def __init__(self, tok, gguf: Path):
        super().__init__(None, tok)
        self.llama = Context(gguf)

    # ---------------------------------------------------------------- answers

    def rows(self, items: list[Item], texts: list[list[int]] | None = None) -> list[list[int] | PtcliError]:
        """engine.Engine's rows, and the refusal of a row whose prompt llama.cpp cannot take."""
        return [refusal(it) or s for it, s in zip(items, super().rows(items, texts))]

    def run(self, items: list[Item], seqs: list[list[int]]) -> list[Prediction]:
        """Answers in order; rows go through llama.cpp in chunks that fit its sequences and cache."""
        answers: list[Prediction] = []
        for chunk in self._chunks(items, seqs):
            answers += self._answer([items[i] for i in chunk], [seqs[i] for i in chunk])
        return answers

    def _chunks(self, items: list[Item], seqs: list[list[int]]) -> list[list[int]]:
        """Consecutive rows whose sequences (a member each, and a copy per candidate) and cells fit."""
        need = []  # each row's (sequences, cells): a member each, and a copy per candidate
        for it, s in zip(items, seqs):
            K, P = it.prompt.members.shape[:2]
            per = 1 + len(it.choices) if it.mode == Mode.RANK else 1
            after = max(map(len, it.choices), default=0) + 2 if it.mode == Mode.RANK else it.max_new
            need.append((K * (1 + per), K * (P + per * (len(s) + after))))  # members' own, and the rows'
        self.llama.fit(max((cells for _, cells in need), default=0))  # the largest row fits a chunk of its own
        chunks: list[list[int]] = [[]]
        used_seqs = used_cells = 0
        for i, (n_seqs, cells) in enumerate(need):
            if chunks[-1] and (used_seqs + n_seqs > MAX_SEQ or used_cells + cells > self.llama.n_ctx):
                chunks.append([])
                used_seqs = used_cells = 0
            chunks[-1].append(i)
            used_seqs, used_cells = used_seqs + n_seqs, used_cells + cells
        return [c for c in chunks if c]

    def _answer(self, items: list[Item], seqs: list[list[int]]) -> list[Prediction]:
        for it in items:
            if it.calibrated:  # before this chunk's rows fill the cache: the bias runs in a cache of its own
                self._bias(it)
        self.llama.clear()
        rows = self._read(items, seqs)  # rows[i][k]: the sequence of row i's member k, its text read
        answers = []
        if any(it.mode == Mode.GENERATE for it in items):
            gen = [i for i, it in enumerate(items) if it.mode == Mode.GENERATE]
            top = max((n for i in gen if (n := items[i].logprobs) is not None), default=None)
            tokens, steps = self._greedy([rows[i] for i in gen], max(items[i].max_new for i in gen), top)
            for i, toks, mine in zip(gen, tokens, steps):
                texts = [self.tok.decode(t[: items[i].max_new], skip_special_tokens=True).strip() for t in toks]
                k = vote(texts)
                n = len(toks[k][: items[i].max_new])
                said = self.logprobs(items[i], mine[k][:n])
                answers.append((i, Prediction(texts[k], len(seqs[i]), n, n < items[i].max_new, said)))
        ranked_rows = [i for i, it in enumerate(items) if it.mode == Mode.RANK]
        if ranked_rows:
            scores = self._scores([rows[i] for i in ranked_rows], [items[i].choices for i in ranked_rows])
            for i, s in zip(ranked_rows, scores):
                mean = means(s, self._bias(items[i]) if items[i].calibrated else None)  # (K, C) -> (C,)
                choice = items[i].choices[int(mean.argmax())]
                answers.append((i, Prediction(choice, len(seqs[i]), scores=tuple(mean.tolist()))))
        return [p for _, p in sorted(answers, key=lambda a: a[0])]

    def _bias(self, item: Item):
        """Contextual calibration of a prompt over an answer set, (K, C): scored after the content-free text."""
        mine = self._biases.setdefault(item.prompt, {})
        if item.choices not in mine:
            free = [Item(item.prompt, t, Mode.RANK, 0, item.choices) for t in CONTENT_FREE]
            laid = [s for s in self.rows(free) if isinstance(s, list)]  # the content-free text fits where rows do
            mine[item.choices] = calibration_bias(np.stack(self.scores(free, laid)))  # (N, K, C) -> (K, C)
        return mine[item.choices]

    def scores(self, items: list[Item], seqs: list[list[int]]) -> list[np.ndarray]:
        """(K, C) summed log-likelihoods of the candidates of ranked rows laid out by `rows` (one chunk's worth)."""
        self.llama.clear()
        return self._scores(self._read(items, seqs), [it.choices for it in items])

    # ---------------------------------------------------------------- llama.cpp passes

    def _read(self, items: list[Item], seqs: list[list[int]]) -> list[list[tuple[int, _Seq]]]:
        """Decode each row behind each of its members: [row][member] -> (sequence id, its state after the row)."""
        shared: dict[tuple[int, int], tuple[int, _Seq]] = {}  # prefix prompts: (id(prompt), k) -> its own sequence
        for it in items:
            for k in range(it.prompt.members.shape[0]) if self.layout(it.prompt).prefix else ():
                shared.setdefault((id(it.prompt), k), (len(shared), _Seq(it.prompt.members.shape[1])))
        if shared:  # each member's P vectors once
            vecs = {
                (id(it.prompt), k): np.asarray(member) for it in items for k, member in enumerate(it.prompt.members)
            }
            batch = [(sid, j, v) for key, (sid, _) in shared.items() for j, v in enumerate(vecs[key])]
            got = self.llama.embeds(batch, {(sid, seq.pos - 1) for sid, seq in shared.values()})
            for sid, seq in shared.values():
                seq.last = got[(sid, seq.pos - 1)]
        rows: list[list[tuple[int, _Seq]]] = []
        work = []  # (sequence, its state, the row's segments, the member's vectors (P, H))
        next_id = len(shared)
        for it, s in zip(items, seqs):
            mine = []
            for k, member in enumerate(it.prompt.members):
                sid, next_id = next_id, next_id + 1
                if (id(it.prompt), k) in shared:  # a copy of the member's cells: shared, not recomputed
                    src, prompt = shared[(id(it.prompt), k)]
                    self.llama.copy(src, sid, 0, prompt.pos)
                    seq = _Seq(prompt.pos, prompt.last)
                else:
                    seq = _Seq()
                mine.append((sid, seq))
                work.append((sid, seq, _segments(s), np.asarray(member)))
            rows.append(mine)
        for n in range(max((len(w[2]) for w in work), default=0)):  # segment n of every row, rows side by side
            toks, vecs_n, ends = [], [], []
            for sid, seq, segs, member in work:
                if n >= len(segs):
                    continue
                kind, values = segs[n]
                if kind == "tokens":
                    toks += [(sid, seq.pos + j, v) for j, v in enumerate(values)]
                else:
                    vecs_n += [(sid, seq.pos + j, member[v]) for j, v in enumerate(values)]
                seq.pos += len(values)
                if n == len(segs) - 1:
                    ends.append((sid, seq))
            want = {(sid, seq.pos - 1) for sid, seq in ends}
            got = {**self.llama.tokens(toks, want), **self.llama.embeds(vecs_n, want)}
            for sid, seq in ends:
                seq.last = got[(sid, seq.pos - 1)]
        return rows

    def _greedy(self, rows: list[list[tuple[int, _Seq]]], max_new: int, top: int | None = None):
        """Greedy tokens of every row's members, eos excluded, up to `max_new`: [row][member] -> tokens,
        and [row][member] -> each token's `Step` (log-probability, `top` likeliest) when `top` is given."""
        eos = self.tok.eos_token_id
        out: list[list[list[int]]] = [[[] for _ in mine] for mine in rows]
        steps: list[list[list[Step]]] = [[[] for _ in mine] for mine in rows]
        live = [(i, k, sid, seq) for i, mine in enumerate(rows) for k, (sid, seq) in enumerate(mine)]
        for step in range(max_new):
            batch = []
            for i, k, sid, seq in live:
                assert seq.last is not None  # every row's text was read
                nxt = int(seq.last.argmax())
                if nxt == eos:
                    continue
                out[i][k].append(nxt)
                if top is not None:
                    steps[i][k].append(_step(seq.last, nxt, top))
                if step < max_new - 1:
                    batch.append((i, k, sid, seq, nxt))
            if not batch:
                break
            got = self.llama.tokens(
                [(sid, seq.pos, t) for _, _, sid, seq, t in batch], {(b[2], b[3].pos) for b in batch}
            )
            for _, _, sid, seq, _ in batch:
                seq.last = got[(sid, seq.pos)]
                seq.pos += 1
            live = [(i, k, sid, seq) for i, k, sid, seq, _ in batch]
        return out, steps

    def _scores(self, rows: list[list[tuple[int, _Seq]]], choices: list[tuple[str, ...]]):
        """(K, C) summed log-likelihoods of each row's candidates (as training saw them: prefix, tokens, eos)."""
        from ptcli.data.encode import answer_tokens

        cands = {c: answer_tokens(self.tok, list(c)) for c in set(choices)}
        jobs = []  # (row, member, candidate, the candidate's copy of the row's sequence, the row's state)
        batch = []
        spare = 1 + max(sid for mine in rows for sid, _ in mine)  # the next free sequence id
        for i, (mine, cs) in enumerate(zip(rows, choices)):
            for k, (sid, seq) in enumerate(mine):
                for c, ids in enumerate(cands[cs]):
                    copy = spare
                    spare += 1
                    self.llama.copy(sid, copy, -1, -1)
                    jobs.append((i, k, c, copy, seq))
                    batch += [(copy, seq.pos + j, t) for j, t in enumerate(ids[:-1])]
        got = self.llama.tokens(batch, {(copy, p) for copy, p, _ in batch})
        out = [np.zeros((len(mine), len(cs)), dtype=np.float32) for mine, cs in zip(rows, choices)]
        after_row: dict[tuple[int, int], np.ndarray] = {}  # (row, member) -> log-probabilities after its text (V,)
        for i, k, c, copy, seq in jobs:
            ids = cands[choices[i]][c]
            assert seq.last is not None  # the row was read
            if (i, k) not in after_row:  # every candidate of the row starts from these: normalised once
                after_row[(i, k)] = _log_softmax(seq.last)
            rest = [_log_softmax(got[(copy, seq.pos + j)])[t] for j, t in enumerate(ids[1:])]
            out[i][k, c] = float(after_row[(i, k)][ids[0]] + sum(rest))
        return out


def _segments(row: list[int]) -> list[tuple[str, list[int]]]:
    """A laid-out row as runs: ("tokens", ids) and ("vectors", prompt indices) (slot -(j+1) is vector j)."""
    segs: list[tuple[str, list[int]]] = []
    for x in row:
        kind, v = ("tokens", x) if x >= 0 else ("vectors", -x - 1)
        if segs and segs[-1][0] == kind:
            segs[-1][1].append(v)
        else:
            segs.append((kind, [v]))
    return segs


def _step(logits: np.ndarray, token: int, top: int) -> Step:
    """A greedy token's log-probability and the `top` likeliest tokens after `logits` (V,), best first."""
    logp = _log_softmax(logits)
    best = np.argsort(-logp, kind="stable")[:top]
    return Step(token, float(logp[token]), tuple((int(t), float(logp[t])) for t in best))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def load_engine(
    project: ProjectDir, base: BaseOptions, status: Callable[[str], None] = lambda _: None, world: int = 1
) -> Engine:
    """The project's GGUF base in llama.cpp, with the torch path's tokenizer (so the token ids agree)."""
    from ptcli.inference.tokenizer import load_tokenizer
    from ptcli.lm.source import resolve

    gguf = check_engine(project, base, world)
    source = Path(resolve(project.base.ref, status))  # the converted copy: its tokenizer and its fingerprint
    check_fingerprint(project, source, status)
    weights = weights_of(gguf, source, base.llama_weights, status)
    tok = load_tokenizer(source)
    status(f"answering with llama.cpp on {weights}")
    return LlamaCppEngine(tok, weights)
