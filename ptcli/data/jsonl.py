"""Read and validate JSON Lines data (encode.py tokenizes it).

Rules (documented in docs/data.md):
- UTF-8, one JSON object per line; a byte-order mark and blank lines are skipped.
- Training and validation rows have exactly `prompt_tag`, `text`, `answer`, all non-empty
  strings, and the tag being tuned. Inference rows need `prompt_tag` and `text`; `answer`
  is optional and any other field is passed through to the output.
- Every problem in a file is collected and reported together as `file:line: message`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptcli.errors import InputError

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
