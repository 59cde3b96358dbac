"""Rows as the model reads them: text and answer tokenized apart, laid out by the template; answer sets.

The model sees text tokens, then the answer tokenized separately with a leading space
(ANSWER_PREFIX), then end-of-sequence. Tokenizing them apart makes the answer mask exact.
Too long: the text is cut from the left so that prompt + text + answer + eos fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptcli.data.jsonl import Record
from ptcli.data.template import PREFIX, Layout
from ptcli.errors import InputError

MAX_CHOICES = 32  # more distinct answers than this is free-form generation, not a closed set


ANSWER_PREFIX = " "


@dataclass
class Encoded:
    ids: list[list[int]]  # text + answer + eos, per example
    labels: list[list[int]]  # aligned with ids; -100 where no loss is taken
    prompts: list[list[int]]  # the row before its answer (what generation starts from)
    answers: list[str]
    truncated: int


def encode(
    tok,
    records: list[Record],
    num_prompt_tokens: int,
    max_seq_length: int,
    answer_only: bool,
    source: str | None = None,
    template: str = PREFIX,
) -> Encoded:
    """Tokenize text and answer separately (batched) and lay them out by the template, cutting long texts from the left.

    `source` names the file in errors.
    """
    layout = Layout(tok, template, num_prompt_tokens)
    texts = tok([r.text for r in records], add_special_tokens=False).input_ids
    out = Encoded([], [], [], [r.answer or "" for r in records], 0)
    for rec, t, a in zip(records, texts, answer_tokens(tok, out.answers)):
        budget = layout.budget(max_seq_length, len(a))
        if budget < 1:
            where = f"{source}:{rec.line}" if source else f"line {rec.line}"
            around = "the prompt and template" if layout.overhead() > num_prompt_tokens else "the prompt"
            raise InputError(
                f"{where}: the answer alone ({len(a)} tokens) plus {around} ({layout.overhead()}) "
                f"exceed --max-seq-length {max_seq_length}"
            )
        if len(t) > budget:
            t, out.truncated = t[-budget:], out.truncated + 1
        ids, labels, context = layout.row(t, a, answer_only)
        out.ids.append(ids)
        out.labels.append(labels)
        out.prompts.append(context)
    return out


def answer_tokens(tok, answers: list[str]) -> list[list[int]]:
    """Answers as training targets: the answer prefix, the answer's tokens, end of sequence."""
    return [
        ids + [tok.eos_token_id]
        for ids in tok([ANSWER_PREFIX + a for a in answers], add_special_tokens=False).input_ids
    ]


def closed_answers(records: list[Record]) -> list[str] | None:
    """The task's answer set when it is small and every answer recurs (a classification task), else None."""
    distinct = sorted({r.answer.strip() for r in records if r.answer})
    return distinct if len(distinct) <= MAX_CHOICES and 2 * len(distinct) <= len(records) else None
