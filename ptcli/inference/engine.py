"""Mixed-tag batches for the server: rows of any tags and requests, answered together.

`ptcli infer` reads a file one tag at a time; a server's queue holds rows of many tags at
once. Here every prompt of a batch (each ensemble member too) is stacked into one (M, P, H)
tensor and each row points at its members, so one pass of the frozen base serves them all
(`forward.prefixed` runs each prompt once and shares its cache with its rows). A batch runs
one pass per mode, generation length and prompt placement (prefix templates or others).

A row gets the answer `ptcli infer` gives it: the same cut of its text, the same greedy
tokens, the same ranking (a candidate's score does not depend on the other candidates of
the pass, so scoring the union of the batch's answer sets and taking the argmax over the
row's own set agrees).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ptcli.data.encode import answer_ids
from ptcli.data.template import Layout
from ptcli.errors import PtcliError, UsageError
from ptcli.lm.forward import answer
from ptcli.project.record import PromptRecord


@dataclass(frozen=True, eq=False)
class Prompt:
    """One bank entry as loaded for serving: (K, P, H) members, its record."""

    tag: str
    members: torch.Tensor  # (K, P, H)
    record: PromptRecord


@dataclass(frozen=True)
class Item:
    """One row to answer: greedy (`generate`, up to max_new tokens) or the likeliest of `choices` (`rank`)."""

    prompt: Prompt
    text: str
    mode: str = "generate"
    max_new: int = 32
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int  # text tokens the model read (after any cut from the left)
    tokens: int = 0  # tokens generated (generate)
    stopped: bool = True  # generation ended at end-of-sequence, not at max_new


class Engine:
    """The frozen base and its tokenizer; answers a batch of Items. Used by one thread at a time."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self._layouts: dict[tuple[str, int], Layout] = {}  # (template, prompt length) -> its layout for this tokenizer

    def __call__(self, items: list[Item]) -> list[Answer | PtcliError]:
        """Answers in item order; an item that cannot run (no room for its text) gets its error instead."""
        seqs = self.texts(items)
        results: list[Answer | PtcliError | None] = [s if isinstance(s, PtcliError) else None for s in seqs]
        fits = {i: s for i, s in enumerate(seqs) if not isinstance(s, PtcliError)}  # rows whose text has room
        passes: dict[tuple[str, int, bool], list[int]] = {}  # one pass per mode, generation length and prompt placement
        for i, it in enumerate(items):
            if results[i] is None:
                passes.setdefault(
                    (it.mode, it.max_new if it.mode == "generate" else 0, self.layout(it.prompt).prefix), []
                ).append(i)
        for (mode, _, _), idx in passes.items():
            run = self._generate if mode == "generate" else self._rank
            with torch.inference_mode():
                for i, out in zip(idx, run([items[i] for i in idx], [fits[i] for i in idx])):
                    results[i] = out
        return results  # type: ignore[return-value]

    def layout(self, prompt: Prompt) -> Layout:
        """Where the tag's template puts the prompt around the text."""
        key = (prompt.record.template, prompt.members.shape[1])
        if key not in self._layouts:
            self._layouts[key] = Layout(self.tok, *key)
        return self._layouts[key]

    def texts(self, items: list[Item]) -> list[list[int] | PtcliError]:
        """Each row as the model reads it before its answer, its text cut from the left as `ptcli infer` cuts it."""
        ids = self.tok([it.text for it in items], add_special_tokens=False).input_ids
        out: list[list[int] | PtcliError] = []
        for it, t in zip(items, ids):
            room = it.max_new if it.mode == "generate" else max(map(len, answer_ids(self.tok, list(it.choices))))
            layout = self.layout(it.prompt)
            budget = it.prompt.record.config["max_seq_length"] - layout.overhead() - room
            if budget < 1:
                out.append(
                    UsageError(
                        f"the answers ({room} tokens) leave no room for text in {it.prompt.tag!r}'s max sequence length"
                    )
                )
            else:
                out.append(layout.context(t[-budget:]))
        return out

    def _expand(self, items: list[Item], seqs: list[list[int]]):
        """Stack the batch's prompts (M, P, H); repeat each row once per member of its tag, member-minor."""
        first: dict[int, int] = {}  # id(prompt) -> index of its first member in the stack
        stacked: list[torch.Tensor] = []
        for it in items:
            if id(it.prompt) not in first:
                first[id(it.prompt)] = sum(len(m) for m in stacked)
                stacked.append(it.prompt.members)
        rows: list[list[int]] = []
        which: list[int] = []
        spans: list[range] = []
        for it, s in zip(items, seqs):
            K = it.prompt.members.shape[0]
            spans.append(range(len(rows), len(rows) + K))
            rows += [s] * K
            which += [first[id(it.prompt)] + k for k in range(K)]
        return torch.cat(stacked), rows, which, spans  # (M, P, H), (R) rows, (R,) which, per item its R rows

    def _generate(self, items: list[Item], seqs: list[list[int]]) -> list[Answer]:
        prompts, rows, which, spans = self._expand(items, seqs)
        tok = self.tok
        max_new = items[
            0
        ].max_new  # the same for the whole pass: a row never decodes past the room its text was cut for
        outs, _ = answer(self.model, prompts, rows, tok.pad_token_id, tok.eos_token_id, which=which, max_new=max_new)
        assert outs is not None  # max_new > 0 asks for tokens
        answers = []
        for s, span in zip(seqs, spans):
            members = [outs[r] for r in span]
            texts = [tok.decode(m, skip_special_tokens=True).strip() for m in members]
            voted = Counter(texts).most_common(1)[0][0]  # ties go to the first member, as in `ptcli infer`
            kept = members[texts.index(voted)]
            answers.append(Answer(voted, len(s), len(kept), len(kept) < max_new))
        return answers

    def _rank(self, items: list[Item], seqs: list[list[int]]) -> list[Answer]:
        prompts, rows, which, spans = self._expand(items, seqs)
        union = list(dict.fromkeys(c for it in items for c in it.choices))
        tok = self.tok
        _, scores = answer(
            self.model, prompts, rows, tok.pad_token_id, tok.pad_token_id, which=which, choices=answer_ids(tok, union)
        )  # (R, C)
        assert scores is not None  # choices ask for scores
        answers = []
        for it, s, span in zip(items, seqs, spans):
            cols = [union.index(c) for c in it.choices]
            mean = scores[list(span)][:, cols].mean(0)  # (C_item,): members' scores averaged
            answers.append(Answer(it.choices[int(mean.argmax())], len(s)))
        return answers
