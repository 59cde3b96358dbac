"""scripts/fetch_glue.py: the split rules of ../shared/data/README.md.

And clear failures without `datasets` or a network.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("fetch_glue", ROOT / "scripts" / "fetch_glue.py")
fetch_glue = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch_glue)


def _rows(texts: list[str]) -> list[dict]:
    return [{"prompt_tag": "T", "text": t, "answer": "a" if i % 2 else "b"} for i, t in enumerate(texts)]


def test_val_takes_whole_groups_of_identical_texts_and_both_keep_source_order() -> None:
    texts = [f"text {i}" for i in range(40)] + ["twice"] * 2 + ["thrice"] * 3
    rows = _rows(texts)
    train, val = fetch_glue.split_val(rows)
    assert len(val) <= round(0.10 * len(rows)) == 4  # n_val = min(500, round(0.10 * N))
    assert len(train) + len(val) == len(rows)
    assert not {r["text"] for r in train} & {r["text"] for r in val}  # a duplicated text never straddles
    assert [rows.index(r) for r in val] == sorted(rows.index(r) for r in val)
    assert fetch_glue.split_val(rows) == (train, val)  # deterministic (random.Random(0))


def test_sentences_are_roots_and_leave_train_with_their_sub_phrases() -> None:
    s1 = "the film is a quiet , moving portrait of a family that never stops surprising us ."
    s2 = "we watched every minute of it and we would gladly watch the whole thing again tomorrow ."
    s3 = "honestly , " + s2  # holds s2: s3 is a root, s2 is not
    phrases = [
        "a quiet , moving portrait",
        "is a",
        "portrait of a famil",
        "unrelated phrase here",
        "too short to count .",
    ]
    rest, picked = fetch_glue.split_sentences(_rows([s1, s2, s3, *phrases]), n=5)
    assert [r["text"] for r in picked] == [s1, s3]  # >= 15 tokens, end in . ! ?, inside no other text; source order
    assert [r["text"] for r in rest] == phrases[1:]  # s2 and "a quiet , moving portrait" sit inside a picked sentence
    assert (
        len(fetch_glue.split_sentences(_rows([s1, s2, s3, *phrases]), n=1)[1]) == 1
    )  # n of them, drawn with a fixed seed


def test_without_datasets_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(SystemExit, match="pip install datasets"):
        fetch_glue.glue_train("RTE")


def test_without_a_network_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(SystemExit, match=r"could not download GLUE rte train .*ConnectionError: no route to host"):
        fetch_glue.glue_train("RTE")


def test_rows_are_converted_as_the_shared_files_are(monkeypatch: pytest.MonkeyPatch) -> None:
    class Split(list):
        features = {"label": types.SimpleNamespace(names=["entailment", "not_entailment"])}

    glue = Split(
        [
            {"sentence1": "A man sleeps.", "sentence2": "A man rests.", "label": 0},
            {"sentence1": "P", "sentence2": "H", "label": 1},
        ]
    )
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: glue))
    assert fetch_glue.glue_train("RTE") == [
        {"prompt_tag": "RTE", "text": "A man sleeps.\nQuestion: A man rests. True or False?", "answer": "True"},
        {"prompt_tag": "RTE", "text": "P\nQuestion: H True or False?", "answer": "False"},
    ]
