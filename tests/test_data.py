"""Reading and validating jsonl, tokenizing with answer masks, and the stateless batch order."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptcli.data.encode import encode
from ptcli.data.jsonl import MAX_REPORTED, Record, read_jsonl
from ptcli.errors import InputError
from ptcli.tuning.batches import BatchOrder

GOOD = {"prompt_tag": "sent", "text": "i love it", "answer": "positive"}


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


def _write(path: Path, lines: list[bytes], end: bytes = b"\n") -> str:
    path.write_bytes(b"".join(line + end for line in lines))
    return str(path)


def _problems(path: str, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        read_jsonl(path, **kw)
    assert info.value.exit_code == 2
    return info.value


def test_good_file(tmp_path: Path) -> None:
    rows = [
        GOOD,
        {"prompt_tag": "sent", "text": "i hate it", "answer": "negative"},
        {"prompt_tag": "sent", "text": "ünï ✓", "answer": "positive"},
    ]
    path = _write(tmp_path / "d.jsonl", [json.dumps(r, ensure_ascii=False).encode() for r in rows])
    records = read_jsonl(path, training=True, tag="sent")
    assert [(r.line, r.tag, r.text, r.answer, r.row) for r in records] == [
        (i, r["prompt_tag"], r["text"], r["answer"], r) for i, r in enumerate(rows, start=1)
    ]


# Each bad row sits on line 3 (line 2 is blank, so line numbers must count blank lines).
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b'{"prompt_tag": "sent", "text": "x"', "invalid JSON ("),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"just a string"', "expected a JSON object, got str"),
        (_line({"prompt_tag": "sent", "text": "x"}), "missing field 'answer'"),
        (_line({"prompt_tag": "sent", "answer": "x"}), "missing field 'text'"),
        (_line({"prompt_tag": "sent", "text": "x", "answer": 1}), "field 'answer' must be a string, got int"),
        (_line({"prompt_tag": "sent", "text": None, "answer": "x"}), "field 'text' must be a string, got NoneType"),
        (_line({"prompt_tag": "sent", "text": "  ", "answer": "x"}), "field 'text' is empty"),
        (_line({"prompt_tag": "sent", "text": "x", "answer": ""}), "field 'answer' is empty"),
        (_line({**GOOD, "id": 3}), "unexpected field(s) 'id'; rows have prompt_tag, text, answer"),
        (_line({**GOOD, "prompt_tag": "other"}), "prompt_tag 'other' does not match the tag being tuned ('sent')"),
        (b'{"prompt_tag": "sent", "text": "caf\xe9", "answer": "x"}', "not UTF-8 (byte 35)"),
    ],
)
def test_each_problem_reported_with_file_and_line(tmp_path: Path, bad: bytes, message: str) -> None:
    path = _write(tmp_path / "d.jsonl", [_line(GOOD), b"", bad, _line(GOOD)])
    e = _problems(path, training=True, tag="sent")
    assert len(e.problems) == 1
    assert e.problems[0].startswith(f"{path}:3: {message}"), e.problems[0]
    assert e.message == f"{path} has 1 problem(s)"


def test_bom_accepted_and_blank_lines_skipped(tmp_path: Path) -> None:
    other = {"prompt_tag": "sent", "text": "i hate it", "answer": "negative"}
    path = _write(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + _line(GOOD), b"", b"   \t", _line(other), b""], end=b"\r\n")
    records = read_jsonl(path, training=True, tag="sent")
    assert [(r.line, r.text) for r in records] == [(1, "i love it"), (4, "i hate it")]
    assert records[0].row == GOOD


def test_bom_only_stripped_at_file_start(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [_line(GOOD), b"\xef\xbb\xbf" + _line(GOOD)])
    e = _problems(path, training=True)
    assert [p.split(": ", 1)[0] for p in e.problems] == [f"{path}:2"]


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.jsonl")
    e = _problems(path, training=True)
    assert e.message == f"data file {path} does not exist"


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    e = _problems(str(path), training=False)
    assert e.problems == [f"{path}: no data rows"]


def test_several_problems_collected(tmp_path: Path) -> None:
    lines = [_line(GOOD), b"nope", _line(GOOD), _line({**GOOD, "answer": 2}), _line({**GOOD, "x": 1, "text": ""})]
    path = _write(tmp_path / "d.jsonl", lines)
    e = _problems(path, training=True, tag="sent")
    assert [p.split(": ", 1)[0] for p in e.problems] == [f"{path}:2", f"{path}:4", f"{path}:5", f"{path}:5"]
    assert e.message == f"{path} has 4 problem(s)"


def test_many_problems_truncated_with_count(tmp_path: Path) -> None:
    n_bad = MAX_REPORTED + 7
    path = _write(tmp_path / "d.jsonl", [_line(GOOD)] + [b"{bad"] * n_bad)
    e = _problems(path, training=True)
    assert e.message == f"{path} has {n_bad} problem(s)"
    assert len(e.problems) == MAX_REPORTED + 1
    assert [p.split(": ", 1)[0] for p in e.problems[:-1]] == [f"{path}:{n}" for n in range(2, 2 + MAX_REPORTED)]
    assert e.problems[-1] == "... and 7 more problems"


def test_inference_rows_answer_optional_extra_fields_kept(tmp_path: Path) -> None:
    rows = [
        {"prompt_tag": "a", "text": "x", "id": 7, "meta": {"k": [1]}},
        {"prompt_tag": "b", "text": "y", "answer": "z"},
    ]
    path = _write(tmp_path / "d.jsonl", [_line(r) for r in rows])
    records = read_jsonl(path, training=False)
    assert [(r.tag, r.text, r.answer, r.row) for r in records] == [("a", "x", None, rows[0]), ("b", "y", "z", rows[1])]


def test_inference_rows_still_checked(tmp_path: Path) -> None:
    lines = [
        _line({"text": "x"}),
        _line({"prompt_tag": "a", "text": "x", "answer": 3}),
        _line({"prompt_tag": "a", "text": "x"}),
    ]
    e = _problems(_write(tmp_path / "d.jsonl", lines), training=False)
    assert [p.split(": ", 1) for p in e.problems] == [
        [f"{e.message.split()[0]}:1", "missing field 'prompt_tag'"],
        [f"{e.message.split()[0]}:2", "field 'answer' must be a string, got int"],
    ]


def test_stdin_is_named_in_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = io.TextIOWrapper(io.BytesIO(_line(GOOD) + b"\n{oops\n"))
    monkeypatch.setattr(sys, "stdin", fake)
    e = _problems("-", training=False)
    assert e.problems[0].startswith("<stdin>:2: invalid JSON")


# ---------------------------------------------------------------- encode

P = 4


def _records(*pairs: tuple[str, str]) -> list[Record]:
    return [Record(i, "sent", t, a, {}) for i, (t, a) in enumerate(pairs, start=1)]


def _tok_ids(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False).input_ids


def test_encode_answer_only_labels(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    recs = _records(("i love it", "positive"), ("the food was terrible and i hated it", "entailment"))
    enc = encode(tok, recs, P, 512, answer_only=True)
    eos = tok.eos_token_id
    assert enc.truncated == 0 and enc.answers == ["positive", "entailment"]
    for rec, ids, labels, prompt in zip(recs, enc.ids, enc.labels, enc.prompts):
        text = _tok_ids(tok, rec.text)
        answer = _tok_ids(tok, " " + rec.answer) + [eos]
        assert prompt == text
        assert ids == text + answer
        assert labels == [-100] * len(text) + answer
        assert tok.decode(ids[len(text) :]) == f" {rec.answer}<|endoftext|>"


def test_encode_full_text_labels(tiny_tokenizer) -> None:
    recs = _records(("i love it", "positive"), ("sports news : the team won", "sports"))
    enc = encode(tiny_tokenizer, recs, P, 512, answer_only=False)
    assert enc.labels == enc.ids
    assert all(-100 not in lab for lab in enc.labels)


def test_encode_cuts_long_text_from_the_left(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    long_text = "the movie was great and i loved it , a positive review . the food was terrible"
    recs = _records(("i love it", "positive"), (long_text, "negative"))
    text = _tok_ids(tok, long_text)
    answer = _tok_ids(tok, " negative") + [tok.eos_token_id]
    keep = 5
    max_len = P + keep + len(answer)
    assert len(text) > keep and len(_tok_ids(tok, "i love it")) + len(_tok_ids(tok, " positive")) + 1 + P <= max_len
    enc = encode(tok, recs, P, max_len, answer_only=True)
    assert enc.truncated == 1
    assert enc.ids[1] == text[-keep:] + answer  # the end of the text and the whole answer survive
    assert enc.prompts[1] == text[-keep:]
    assert len(enc.ids[1]) + P == max_len
    assert enc.ids[0] == _tok_ids(tok, "i love it") + _tok_ids(tok, " positive") + [tok.eos_token_id]


def test_encode_exact_fit_is_not_truncated(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    rec = _records(("i love it", "positive"))
    n = len(_tok_ids(tok, "i love it")) + len(_tok_ids(tok, " positive")) + 1
    assert encode(tok, rec, P, P + n, answer_only=True).truncated == 0
    assert encode(tok, rec, P, P + n - 1, answer_only=True).truncated == 1


def test_encode_answer_too_long(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    recs = _records(("i love it", "positive"), ("i hate it", "entailment"))
    answer_len = len(_tok_ids(tok, " entailment")) + 1
    with pytest.raises(InputError) as info:
        encode(tok, recs, P, P + answer_len, answer_only=True)
    assert info.value.message.startswith(f"line 2: the answer alone ({answer_len} tokens) plus the prompt ({P})")
    assert "--max-seq-length" in info.value.message


# ---------------------------------------------------------------- BatchOrder


def _flat(order: BatchOrder, steps: int) -> list[int]:
    return [i for s in range(steps) for i in order.batch(s)]


@pytest.mark.parametrize(("n", "bs"), [(10, 5), (7, 3), (5, 8), (1, 2)])
def test_each_epoch_visits_every_example_once(n: int, bs: int) -> None:
    epochs = 6
    steps = n * epochs // bs
    flat = _flat(BatchOrder(n, bs, seed=3), steps)
    for e in range(len(flat) // n):
        assert sorted(flat[e * n : (e + 1) * n]) == list(range(n))
    assert all(len(BatchOrder(n, bs, 3).batch(s)) == bs for s in range(steps))


def test_epochs_are_reshuffled() -> None:
    flat = _flat(BatchOrder(12, 4, seed=0), 12)
    epochs = {tuple(flat[i : i + 12]) for i in range(0, 36, 12)}
    assert len(epochs) > 1


def test_order_deterministic_per_seed() -> None:
    assert _flat(BatchOrder(20, 3, 42), 30) == _flat(BatchOrder(20, 3, 42), 30)
    assert _flat(BatchOrder(20, 3, 42), 30) != _flat(BatchOrder(20, 3, 43), 30)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), bs=st.integers(1, 12), seed=st.integers(0, 2**31), shuffle_seed=st.integers(0, 1000))
def test_batch_is_stateless(n: int, bs: int, seed: int, shuffle_seed: int) -> None:
    steps = list(range(3 * n // bs + 3))
    expected = {s: BatchOrder(n, bs, seed).batch(s) for s in steps}  # each on a fresh object
    order = BatchOrder(n, bs, seed)
    shuffled = steps * 2
    random.Random(shuffle_seed).shuffle(shuffled)
    for s in shuffled:
        assert order.batch(s) == expected[s]


def test_rows_of_tags_tuned_together(tmp_path) -> None:
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt_tag": t, "text": "x", "answer": "y"} for t in ("a", "b", "c")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError) as info:
        read_jsonl(str(path), training=True, tag=("a", "b"))
    assert info.value.problems == [f"{path}:3: prompt_tag 'c' does not match the tags being tuned ('a', 'b')"]
    assert [r.tag for r in read_jsonl(str(path), training=True, tag=("a", "b", "c"))] == ["a", "b", "c"]


@pytest.mark.parametrize(("n", "bs"), [(1000, 16), (997, 16), (50, 7), (5, 8)])
def test_length_grouped_batches_keep_epochs_whole_and_cut_padding(n: int, bs: int) -> None:
    lengths = [random.Random(i).randint(1, 60) for i in range(n)]
    grouped, plain = BatchOrder(n, bs, 5, lengths), BatchOrder(n, bs, 5)
    steps = 3 * n // bs
    flat = _flat(grouped, steps)
    for e in range(len(flat) // n):
        assert sorted(flat[e * n : (e + 1) * n]) == list(range(n))
    assert _flat(grouped, steps) == _flat(BatchOrder(n, bs, 5, lengths), steps)  # stateless and seeded

    def padded(order: BatchOrder) -> int:
        return sum(bs * max(lengths[i] for i in order.batch(s)) for s in range(steps))

    if n >= 20 * bs:  # enough rows for groups to form, in every epoch (n % bs shifts later epochs)
        assert padded(grouped) < 0.6 * padded(plain)
        firsts = [lengths[grouped.batch(s)[0]] for s in range(steps)]
        assert firsts != sorted(firsts)  # the batches themselves come in random order
