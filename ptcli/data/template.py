"""Where the soft prompt sits in a row: task templates.

A template is text with three kinds of placeholder:
  {text}      the row's text (once)
  {prompt:N}  N of the project's prompt vectors; a bare {prompt} takes the ones left over
  {answer}    the answer, written as training saw it (" " + answer, then end-of-sequence); last
Anything else is literal text, tokenized on its own, e.g. "{text}\\nAnswer:{prompt}{answer}"
(a typed backslash-n or backslash-t stands for a newline or a tab, as a shell passes it in quotes).
The prompt slots add up to the project's prompt length; they are filled in order, so
`{prompt:5}{text}{prompt:15}{answer}` puts vectors 0-4 before the text and 5-19 after it.
Two names stand for common layouts: `prefix` (the default, the seed's layout) and `suffix`.

A row is laid out as a list of ints: token ids, and -(j+1) for prompt vector j. The default
layout (one prompt block first) keeps today's plain token lists, with the prompt implicit in
front, so it runs on the shared-prompt fast path. No torch here: light commands validate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ptcli.errors import UsageError

PREFIX = "{prompt}{text}{answer}"
NAMED = {"prefix": PREFIX, "suffix": "{text}{prompt}{answer}"}
_HOLE = re.compile(r"\{([A-Za-z_]*)(?::([^}]*))?\}")


@dataclass(frozen=True)
class Piece:
    kind: str  # "lit", "text", "prompt" or "answer"
    value: str = ""  # the literal text
    size: int = 0  # prompt vectors in this slot


def parse(template: str, num_prompt_tokens: int) -> list[Piece]:
    """The pieces of a template, or UsageError naming every problem with it."""
    source = (
        NAMED.get(template, template).replace("\\n", "\n").replace("\\t", "\t")
    )  # '\n' typed in a shell is a newline
    pieces: list[Piece] = []
    problems: list[str] = []
    at, bare = 0, 0
    for m in _HOLE.finditer(source):
        if m.start() > at:
            pieces.append(Piece("lit", source[at : m.start()]))
        at = m.end()
        name, size = m.group(1), m.group(2)
        if name in ("text", "answer") and size is None:
            pieces.append(Piece(name))
        elif name == "prompt" and size is None:
            pieces.append(Piece("prompt", size=-1))
            bare += 1
        elif name == "prompt" and size.isdigit() and int(size) > 0:
            pieces.append(Piece("prompt", size=int(size)))
        else:
            problems.append(
                f"{m.group(0)!r} is not a placeholder (use {{text}}, {{answer}}, {{prompt}} or {{prompt:N}}, N >= 1)"
            )
    if at < len(source):
        pieces.append(Piece("lit", source[at:]))
    kinds = [p.kind for p in pieces]
    for name in ("text", "answer"):
        if kinds.count(name) != 1:
            problems.append(f"needs {{{name}}} exactly once, found it {kinds.count(name)} times")
    if "answer" in kinds and kinds[-1] != "answer":
        problems.append("{answer} must come last (the answer ends the row)")
    if "prompt" not in kinds:
        problems.append("needs at least one {prompt} slot")
    fixed = sum(p.size for p in pieces if p.kind == "prompt" and p.size > 0)
    if bare > 1:
        problems.append("at most one bare {prompt} (it takes the vectors the sized slots leave)")
    elif bare == 1 and fixed >= num_prompt_tokens:
        problems.append(
            f"the sized slots take {fixed} vectors, "
            f"leaving none of the project's {num_prompt_tokens} for the bare {{prompt}}"
        )
    elif bare == 0 and "prompt" in kinds and fixed != num_prompt_tokens:
        problems.append(f"the slots hold {fixed} vectors but the project's prompt length is {num_prompt_tokens}")
    if problems:
        raise UsageError(
            f"--template {template!r}: " + "; ".join(problems),
            hint=f"e.g. --template '{{text}}{{prompt}}{{answer}}'; names: {', '.join(NAMED)}",
        )
    return [Piece("prompt", size=num_prompt_tokens - fixed) if p.size == -1 else p for p in pieces]


def is_prefix(pieces: list[Piece]) -> bool:
    """One prompt block first and none after: the prompt runs once per batch and rows share its cache."""
    return pieces[0].kind == "prompt" and sum(p.kind == "prompt" for p in pieces) == 1


class Layout:
    """Lays rows out by a template, for one tokenizer."""

    def __init__(self, tok, template: str, num_prompt_tokens: int):
        self.pieces = parse(template, num_prompt_tokens)
        self.prefix = is_prefix(self.pieces)
        self.P = num_prompt_tokens
        self._lit = {p.value: tok(p.value, add_special_tokens=False).input_ids for p in self.pieces if p.kind == "lit"}

    def overhead(self) -> int:
        """Positions a row takes besides its text and answer: prompt vectors and literal tokens."""
        return self.P + sum(len(self._lit[p.value]) for p in self.pieces if p.kind == "lit")  # each time it stands

    def budget(self, max_seq_length: int, after: int) -> int:
        """Text tokens that fit in `max_seq_length` beside the prompt, the literals and `after` positions (the
        answer in training; the generation room or the longest candidate when answering). Below 1: none fit."""
        return max_seq_length - self.overhead() - after

    def row(self, text: list[int], answer: list[int], answer_only: bool) -> tuple[list[int], list[int], list[int]]:
        """(ids, labels, context): the whole row, its loss labels (-100: none), and the part before the answer.

        Tokens before the first prompt vector take no loss: no prompt can change them.
        """
        ids: list[int] = []
        labels: list[int] = []
        slot, seen_prompt = 0, False
        for p in self.pieces[1:] if self.prefix else self.pieces:
            if p.kind == "prompt":
                part = [-(slot + j + 1) for j in range(p.size)]
                slot, seen_prompt = slot + p.size, True
                labels += [-100] * p.size
            else:
                part = answer if p.kind == "answer" else text if p.kind == "text" else self._lit[p.value]
                scored = p.kind == "answer" or (not answer_only and (seen_prompt or self.prefix))
                labels += part if scored else [-100] * len(part)
            if p.kind == "answer":
                return ids + part, labels, ids
            ids += part
        raise AssertionError("parse() puts {answer} last")

    def context(self, text: list[int]) -> list[int]:
        """The row before its answer: what generation and ranking continue from."""
        return self.row(text, [], True)[2]
