"""Mixed-tag batches: rows of any tags (and requests) answered together, by the rules of lm/answers.py.

`ptcli infer`, `Project.infer` and the server all answer through `Engine`. Every prompt of a
batch (each ensemble member too) is stacked into one (M, P, H) tensor and each row points at
its members, so one pass of the frozen base serves them all (`forward.prefixed` runs each
prompt once and shares its cache with its rows). A batch runs one pass per `pass_key`: mode,
generation length and prompt placement (prefix templates or others). Ranked rows of a pass
score the union of their answer sets; a candidate's score does not depend on the other
candidates of the pass, so the argmax over a row's own set is the one its tag alone gives.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ptcli.data.template import Layout
from ptcli.enums import Mode
from ptcli.errors import PtcliError
from ptcli.lm.rules import Step, means, room, text_budget, vote
from ptcli.project.record import PromptRecord

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class Prompt:
    """One bank entry as loaded for answering: (K, D*P, H) members (D: the record's depth), its record.

    The members are a torch tensor, or a numpy array for the llama.cpp engine (`bank.get(..., numpy=True)`)."""

    tag: str
    members: Any  # (K, D*P, H): torch.Tensor | np.ndarray
    record: PromptRecord

    @classmethod
    def of(cls, tag: str, prompt: Any, record: PromptRecord) -> Prompt:
        """From what `bank.get` returns: a prompt (P, H), or an ensemble's (K, P, H)."""
        return cls(tag, prompt if prompt.ndim == 3 else prompt[None], record)  # (K, P, H)


@dataclass(frozen=True)
class Item:
    """One row to answer: greedy (`generate`, up to max_new tokens) or the likeliest of `choices` (`rank`)."""

    prompt: Prompt
    text: str
    mode: Mode = Mode.GENERATE
    max_new: int = 32
    choices: tuple[str, ...] = ()
    calibrated: bool = False  # rank: contextual calibration of the scores
    logprobs: int | None = None  # generate: each token's log-probability and this many likeliest tokens


@dataclass(frozen=True)
class Logprob:
    """A generated token (decoded alone), its log-probability, and the likeliest tokens at its step, best first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Prediction:
    text: str
    prompt_tokens: int  # text tokens the model read (after any cut from the left)
    tokens: int = 0  # tokens generated (generate)
    stopped: bool = True  # generation ended at end-of-sequence, not at max_new
    logprobs: tuple[Logprob, ...] | None = None  # the generated tokens' (when the item asked), eos excluded
    scores: tuple[float, ...] = ()  # rank: each candidate's members' mean score (calibrated if asked), in item order


MAX_ROOMS = 1024  # answer sets whose room an engine remembers
PassKey = tuple[str, int, bool, int, int]  # mode, generation length (0 if ranked), prefix placement, layer, depth


class Engine:
    """The frozen base and its tokenizer; answers a batch of Items. Used by one thread at a time."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self._layouts: dict[tuple[str, int], Layout] = {}  # (template, prompt length) -> its layout for this tokenizer
        # prompt -> choices -> (K, C); weak: a prompt the bank replaced takes its biases with it
        self._biases: weakref.WeakKeyDictionary[Prompt, dict[tuple[str, ...], Any]]  # torch, or numpy (llama.cpp)
        self._biases = weakref.WeakKeyDictionary()
        self._rooms: dict[tuple[str, int, tuple[str, ...]], int] = {}  # (mode, max_new, choices) -> positions

    def __call__(self, items: list[Item]) -> list[Prediction | PtcliError]:
        """Answers in item order; an item that cannot run (no room for its text) gets its error instead."""
        seqs = self.rows(items)
        errors = {i: s for i, s in enumerate(seqs) if isinstance(s, PtcliError)}
        fits = {i: s for i, s in enumerate(seqs) if not isinstance(s, PtcliError)}  # rows whose text has room
        answered = dict(zip(fits, self.run([items[i] for i in fits], list(fits.values()))))
        return [answered[i] if i in answered else errors[i] for i in range(len(items))]

    def layout(self, prompt: Prompt) -> Layout:
        """Where the tag's template puts the prompt around the text."""
        key = (prompt.record.template, prompt.members.shape[1] // prompt.record.depth)  # P: a deep prompt has D*P rows
        if key not in self._layouts:
            self._layouts[key] = Layout(self.tok, *key)
        return self._layouts[key]

    def pass_key(self, item: Item) -> PassKey:
        """Rows with one key run in one pass of the base."""
        mode, prompt = item.mode, item.prompt
        return (
            mode,
            item.max_new if mode == Mode.GENERATE else 0,
            self.layout(prompt).prefix,
            prompt.record.prompt_layer,
            prompt.record.depth,
        )

    def rows(self, items: list[Item], texts: list[list[int]] | None = None) -> list[list[int] | PtcliError]:
        """Each row as the model reads it before its answer, its text (token ids, if given) cut to the budget."""
        ids = texts if texts is not None else self.tok([it.text for it in items], add_special_tokens=False).input_ids
        out: list[list[int] | PtcliError] = []
        for it, t in zip(items, ids):
            layout = self.layout(it.prompt)
            try:
                key = (it.mode, it.max_new, it.choices)
                if key not in self._rooms:  # tokenize an answer set once, not once a row
                    if len(self._rooms) >= MAX_ROOMS:  # clients may send any answer sets: keep the newest
                        del self._rooms[next(iter(self._rooms))]
                    self._rooms[key] = room(self.tok, *key)
                after = self._rooms[key]
                budget = text_budget(it.prompt.tag, it.prompt.record.config["max_seq_length"], layout, after)
            except PtcliError as e:
                out.append(e)
                continue
            out.append(layout.context(t[-budget:]))  # texts cut from the left to fit
        return out

    def laid_out(self, items: list[Item], texts: list[list[int]] | None = None) -> list[list[int]]:
        """`rows` of every item, or the first row's error: every row is checked before any is answered."""
        seqs = self.rows(items, texts)
        for s in seqs:
            if isinstance(s, PtcliError):
                raise s
        return [s for s in seqs if not isinstance(s, PtcliError)]  # all of them, as lists of ids

    def run(self, items: list[Item], seqs: list[list[int]]) -> list[Prediction]:
        """Answers for rows laid out by `rows`, in order: one pass per pass key."""
        import torch

        from ptcli.lm.depth import entering

        passes: dict[PassKey, list[int]] = {}
        for i, it in enumerate(items):
            passes.setdefault(self.pass_key(it), []).append(i)
        results: dict[int, Prediction] = {}
        for (mode, max_new, _, layer, depth), idx in passes.items():
            batch, rows = [items[i] for i in idx], [seqs[i] for i in idx]
            with torch.inference_mode(), entering(self.model, layer, depth):
                answers = self._generate(batch, rows, max_new) if mode == Mode.GENERATE else self._rank(batch, rows)
            results.update(zip(idx, answers))
        return [results[i] for i in range(len(items))]

    def _prompts(self, items: list[Item]) -> tuple[list[torch.Tensor], list[int]]:
        """The batch's distinct prompts, in order of first use, and which of them each row uses."""
        distinct = {id(it.prompt): it.prompt for it in items}  # dicts keep the order of first insertion
        index = {key: j for j, key in enumerate(distinct)}
        return [p.members for p in distinct.values()], [index[id(it.prompt)] for it in items]

    def _generate(self, items: list[Item], seqs: list[list[int]], max_new: int) -> list[Prediction]:
        from ptcli.lm.answers import run_rows

        prompts, owner = self._prompts(items)
        top = max((it.logprobs for it in items if it.logprobs is not None), default=None)
        out = run_rows(self.model, self.tok, prompts, seqs, owner, max_new=max_new, top=top)
        assert out.tokens is not None and out.texts is not None  # max_new > 0 asks for tokens
        answers = []
        for i, (it, s, tokens, texts) in enumerate(zip(items, seqs, out.tokens, out.texts)):
            k = vote(texts)
            steps = self.logprobs(it, out.steps[i][k]) if out.steps is not None else None
            answers.append(Prediction(texts[k], len(s), len(tokens[k]), len(tokens[k]) < max_new, steps))
        return answers

    def logprobs(self, item: Item, steps: list[Step]) -> tuple[Logprob, ...] | None:
        """The steps of the member that answered, as text, with the item's own number of likeliest tokens."""
        if item.logprobs is None:
            return None
        word = self.tok.decode
        return tuple(
            Logprob(word([s.token]), s.logprob, tuple((word([t]), lp) for t, lp in s.top[: item.logprobs]))
            for s in steps
        )

    def _rank(self, items: list[Item], seqs: list[list[int]]) -> list[Prediction]:
        from ptcli.lm.answers import run_rows

        prompts, owner = self._prompts(items)
        union = list(dict.fromkeys(c for it in items for c in it.choices))
        out = run_rows(self.model, self.tok, prompts, seqs, owner, choices=union)
        assert out.scores is not None  # choices ask for scores
        answers = []
        for it, s, scores in zip(items, seqs, out.scores):
            cols = [union.index(c) for c in it.choices]
            mean = means(scores[:, cols], self._bias(it) if it.calibrated else None)  # (K, C_item) -> (C_item,)
            answers.append(Prediction(it.choices[int(mean.argmax())], len(s), scores=tuple(mean.tolist())))
        return answers

    def _bias(self, item: Item) -> Any:
        """Contextual calibration of a prompt over an answer set, (K, C), computed once per engine."""
        from ptcli.lm.answers import content_free_bias
        from ptcli.lm.depth import entering

        mine = self._biases.setdefault(item.prompt, {})
        if item.choices not in mine:
            layout = self.layout(item.prompt)  # called from run, under its inference_mode
            with entering(self.model, item.prompt.record.prompt_layer, item.prompt.record.depth):
                mine[item.choices] = content_free_bias(
                    self.model, self.tok, item.prompt.members, list(item.choices), layout
                )
        return mine[item.choices]
