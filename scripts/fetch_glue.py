"""Write bench/'s data folder (SST2/ and RTE/ as JSON Lines) from the GLUE train sets, for a clone without ../shared.

    pip install datasets                       # not a ptcli dependency
    python scripts/fetch_glue.py --out data    # then: python bench/quality.py --data-dir data

Follows the rules of ../shared/data/README.md, so the files match the shared ones:
  * rows: {"prompt_tag", "text", "answer"}; SST2 text = the sentence (trailing space of the
    Hugging Face copy removed), answer positive/negative; RTE text = sentence1 + "\\nQuestion: "
    + sentence2 + " True or False?", answer True (entailment) / False.
  * val.jsonl: n_val = min(500, round(0.10 * N)) rows of the GLUE train split, taken as whole
    groups of identical texts in the order of random.Random(0).shuffle over the distinct texts
    (first appearance), until the next group would pass n_val; train.jsonl is the rest.
    Both keep the source order.
  * SST2/val_sentences.jsonl: 500 whole sentences (>= 15 tokens, ending in . ! or ?, inside no
    other train text), drawn with random.Random(0); they and every train text of >= 3 tokens
    inside one of them leave train.jsonl.
Only GLUE's train splits are read: the dev splits are the hidden test and are never fetched.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TASKS = {  # task -> (GLUE config, row -> (text, answer))
    "SST2": ("sst2", lambda r, names: (r["sentence"].strip(), names[r["label"]])),
    "RTE": (
        "rte",
        lambda r, names: (
            f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?",
            {"entailment": "True", "not_entailment": "False"}[names[r["label"]]],
        ),
    ),
}


def glue_train(task: str) -> list[dict]:
    """GLUE's train split of a task as ptcli rows, through the `datasets` library."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit(
            "error: scripts/fetch_glue.py needs the `datasets` library\nhint: pip install datasets"
        ) from None
    config, convert = TASKS[task]
    try:
        ds = load_dataset("nyu-mll/glue", config, split="train")
    except Exception as e:  # no network, hub down, a proxy: say so, not a traceback
        raise SystemExit(
            f"error: could not download GLUE {config} train through `datasets` ({type(e).__name__}: {e})\n"
            "hint: this needs access to the Hugging Face hub; or pass bench/ an existing folder with --data-dir"
        ) from None
    names = ds.features["label"].names
    return [dict(zip(("text", "answer"), convert(r, names)), prompt_tag=task) for r in ds]


def split_val(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, val): whole groups of identical texts go to val in a seeded order until n_val is reached."""
    n_val = min(500, round(0.10 * len(rows)))
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["text"], []).append(i)
    texts = list(groups)
    random.Random(0).shuffle(texts)
    val: set[int] = set()
    for t in texts:
        if len(val) + len(groups[t]) > n_val:
            break
        val.update(groups[t])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def split_sentences(train: list[dict], n: int = 500, min_tokens: int = 15) -> tuple[list[dict], list[dict]]:
    """(train, val_sentences): n sentence roots drawn from train, and train without them and their sub-phrases."""
    texts = list(dict.fromkeys(r["text"] for r in train))
    by_start: dict[tuple[str, ...], list[str]] = {}  # first min_tokens tokens of every window -> texts holding it
    for t in texts:
        toks = t.split()
        for s in range(len(toks) - min_tokens + 1):
            by_start.setdefault(tuple(toks[s : s + min_tokens]), []).append(t)

    def root(t: str) -> bool:
        toks = t.split()
        return (
            len(toks) >= min_tokens
            and t[-1] in ".!?"
            and not any(u != t and f" {t} " in f" {u} " for u in by_start.get(tuple(toks[:min_tokens]), []))
        )

    picked = [t for t in texts if root(t)]
    random.Random(0).shuffle(picked)
    chosen = set(picked[:n])
    spans = {
        " ".join(toks[a:b])
        for toks in (t.split() for t in chosen)
        for a in range(len(toks))
        for b in range(a + 3, len(toks) + 1)
    }
    return [r for r in train if r["text"] not in spans], [r for r in train if r["text"] in chosen]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt_tag": r["prompt_tag"], "text": r["text"], "answer": r["answer"]} for r in rows]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder to write TASK/*.jsonl into")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = ap.parse_args()
    for task in args.tasks:
        train, val = split_val(glue_train(task))
        files = {"train": train, "val": val}
        if task == "SST2":
            files["train"], files["val_sentences"] = split_sentences(train)
        for split, rows in files.items():
            write_jsonl(args.out / task / f"{split}.jsonl", rows)
            print(f"wrote {args.out / task / f'{split}.jsonl'} ({len(rows)} rows)", file=sys.stderr)


if __name__ == "__main__":
    main()
