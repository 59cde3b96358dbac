"""Read and validate JSON Lines data; tokenize; order batches.

Rules (documented in the README):
- UTF-8, one JSON object per line; a byte-order mark and blank lines are skipped.
- Training and validation rows have exactly `prompt_tag`, `text`, `answer`, all non-empty
  strings, and the tag being tuned. Inference rows need `prompt_tag` and `text`; `answer`
  is optional and any other field is passed through to the output.
- Every problem in a file is collected and reported together as `file:line: message`.
- The model sees text tokens, then the answer tokenized separately with a leading space
  (ANSWER_PREFIX), then end-of-sequence. Tokenizing them apart makes the answer mask exact.
- Too long: the text is cut from the left so that prompt + text + answer + eos fit.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptcli.errors import InputError
from ptcli.template import PREFIX, Layout

ANSWER_PREFIX = " "
MAX_CHOICES = 32  # more distinct answers than this is free-form generation, not a closed set
MAX_REPORTED = 20
TRAIN_FIELDS = ("prompt_tag", "text", "answer")


@dataclass
class Record:
    line: int
    tag: str
    text: str
    answer: str | None
    row: dict[str, Any] = field(repr=False)


def _read_lines(path: str) -> tuple[str, list[bytes]]:
    if path == "-":
        return "<stdin>", sys.stdin.buffer.read().split(b"\n")
    p = Path(path)
    if not p.exists() or p.is_dir():  # a pipe such as `--train <(cmd)` is fine
        raise InputError(f"data file {path} does not exist", hint="check the path")
    return path, p.read_bytes().split(b"\n")


def read_jsonl(path: str, *, training: bool, tag: str | tuple[str, ...] | None = None) -> list[Record]:
    """All rows of a file, or InputError listing every problem (the first 20, then a count).

    `tag` (one, or several tuned together) is what a training row's prompt_tag must be.
    """
    name, lines = _read_lines(path)
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    records: list[Record] = []
    problems: list[str] = []
    for no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(f"{name}:{no}: not UTF-8 (byte {e.start})")
            continue
        except ValueError as e:
            problems.append(f"{name}:{no}: invalid JSON ({e})")
            continue
        except RecursionError:
            problems.append(f"{name}:{no}: invalid JSON (nested too deeply)")
            continue
        row_problems = _check_row(row, training, tag)
        if b"\\u" in raw and isinstance(row, dict):  # only a \u escape can smuggle in a lone surrogate
            row_problems += _lone_surrogates(row)
        problems.extend(f"{name}:{no}: {p}" for p in row_problems)
        if not row_problems:
            records.append(Record(no, row["prompt_tag"], row["text"], row.get("answer"), row))
    if not records and not problems:
        problems.append(f"{name}: no data rows")
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more problems")
        raise InputError(f"{name} has {len(problems)} problem(s)", shown)
    return records


def _check_row(row: Any, training: bool, tag: str | tuple[str, ...] | None) -> list[str]:
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    problems = []
    required = TRAIN_FIELDS if training else ("prompt_tag", "text")
    for key in TRAIN_FIELDS:
        if key not in row:
            if key in required:
                problems.append(f"missing field {key!r}")
        elif not isinstance(row[key], str):
            problems.append(f"field {key!r} must be a string, got {type(row[key]).__name__}")
        elif not row[key].strip():
            problems.append(f"field {key!r} is empty")
    if training:
        extra = sorted(set(row) - set(TRAIN_FIELDS))
        if extra:
            problems.append(f"unexpected field(s) {', '.join(map(repr, extra))}; rows have prompt_tag, text, answer")
        tags = (tag,) if isinstance(tag, str) else tag
        if tags and isinstance(row.get("prompt_tag"), str) and row["prompt_tag"] not in tags:
            being = (
                f"the tag being tuned ({tag!r})"
                if len(tags) == 1
                else f"the tags being tuned ({', '.join(map(repr, tags))})"
            )
            problems.append(f"prompt_tag {row['prompt_tag']!r} does not match {being}")
    return problems


def check_inference_row(row: Any) -> list[str]:
    """The problems `read_jsonl` reports for one inference row; the server checks the rows it receives with it."""
    problems = _check_row(row, False, None)
    return problems + _lone_surrogates(row) if isinstance(row, dict) else problems


def _lone_surrogates(row: dict[str, Any]) -> list[str]:
    """json accepts escapes like \\ud800 that decode to no character; the tokenizer and UTF-8 output reject them."""
    problems = []
    for key, value in row.items():
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            problems.append(f"field {key!r} holds a lone surrogate {e.object[e.start]!r}, which is not valid Unicode")
    return problems


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
    for rec, t, a in zip(records, texts, answer_ids(tok, out.answers)):
        budget = max_seq_length - layout.overhead() - len(a)
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


def answer_ids(tok, answers: list[str]) -> list[list[int]]:
    """Answers as training targets: the answer prefix, the answer's tokens, end of sequence."""
    return [
        ids + [tok.eos_token_id]
        for ids in tok([ANSWER_PREFIX + a for a in answers], add_special_tokens=False).input_ids
    ]


def closed_answers(records: list[Record]) -> list[str] | None:
    """The task's answer set when it is small and every answer recurs (a classification task), else None."""
    distinct = sorted({r.answer.strip() for r in records if r.answer})
    return distinct if len(distinct) <= MAX_CHOICES and 2 * len(distinct) <= len(records) else None


class BatchOrder:
    """Which examples form global batch `step`: a fresh seeded shuffle each epoch.

    Stateless in the step, so a resumed run sees exactly the batches it would have seen.
    Given the examples' lengths, each epoch's shuffle is cut into spans of GROUP batches,
    each span sorted by length and dealt into batches, and the batches shuffled: rows of a
    batch have similar lengths, so little compute goes to padding (SST-2's random batches
    are 2.6x longer than their average row), and the order of lengths stays random.
    """

    GROUP = 64

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        self.n, self.batch_size, self.seed, self.lengths = n, batch_size, seed, lengths
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            rng = random.Random(self.seed * 100_003 + epoch)
            perm = list(range(self.n))
            rng.shuffle(perm)
            if (lengths := self.lengths) is not None:
                B = self.batch_size
                lead = min(self.n, (-epoch * self.n) % B)  # finish the batch the last epoch began
                end = lead + (self.n - lead) // B * B  # whole batches; a partial one stays last
                batches = []
                for k in range(lead, end, self.GROUP * B):
                    chunk = sorted(perm[k : min(k + self.GROUP * B, end)], key=lambda i: lengths[i])
                    batches += [chunk[j : j + B] for j in range(0, len(chunk), B)]
                rng.shuffle(batches)
                perm = perm[:lead] + [i for b in batches for i in b] + perm[end:]
            self._perms = {epoch: perm}
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]
