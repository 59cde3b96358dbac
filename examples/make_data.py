"""Generate the small synthetic demo task that ships with ptcli's examples.

ptcli's main job is to tune one soft prompt per task tag on a frozen base model
and then serve many tags from one batch. Demonstrating that needs a data set that
is small, license-free, instant to produce and has more than one tag, so this
script builds two toy classification tasks from templates and word lists:

* ``reviews``: one-sentence product, restaurant and movie reviews; the answer is
  ``positive`` or ``negative``. Besides plain praise and complaints it includes
  negation ("not bad at all", "not great") and contrast ("X but Y", where the
  clause after "but" decides), so a prompt has to learn more than keyword
  spotting.
* ``topic``: one-sentence news items; the answer is ``sports``, ``food`` or
  ``science``.

Every row is a JSON object with exactly three string fields,
``{"prompt_tag": ..., "text": ..., "answer": ...}``, one per line. Each split is
balanced per tag and answer, tags are shuffled together, and no text appears in
more than one split. The generator uses a fixed seed and only the standard
library, so running it again rewrites byte-identical files:

    python examples/make_data.py            # writes examples/data/{train,valid,test}.jsonl
    python examples/make_data.py --out DIR  # somewhere else

This is a demo, not a benchmark: the quality numbers reported for ptcli come
from the real data sets under ``../shared/data`` (SST-2, RTE).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234
MIN_WORDS, MAX_WORDS = 6, 20

# Rows per answer in each split: (train, valid, test).
# reviews: 2 answers -> 320 / 40 / 80 rows; topic: 3 answers -> 240 / 30 / 60 rows.
SPLIT_NAMES = ("train", "valid", "test")
PER_ANSWER = {
    "reviews": (160, 20, 40),
    "topic": (80, 10, 20),
}
ANSWERS = {
    "reviews": ("positive", "negative"),
    "topic": ("sports", "food", "science"),
}

# --------------------------------------------------------------------- reviews

# Each domain has singular subjects (so "was" always agrees), its own praise and
# complaint words on top of the shared ones, and closing clauses of each polarity.
DOMAINS = {
    "product": {
        "subjects": [
            "this blender", "the phone case", "this laptop", "the printer",
            "the vacuum cleaner", "the charger", "this backpack", "the keyboard",
            "the coffee maker", "this lamp", "this tent", "the headset",
        ],
        "pos_adj": ["sturdy", "reliable", "well made", "easy to use", "solid"],
        "neg_adj": ["flimsy", "cheap", "unreliable", "useless", "overpriced"],
        "pos_end": [
            "worth every penny", "i would buy it again",
            "i use it every day", "it was a great purchase",
        ],
        "neg_end": [
            "i am sending it back", "i would not buy it again",
            "what a waste of money", "it broke within a week",
        ],
    },
    "restaurant": {
        "subjects": [
            "the pasta", "the burger", "the curry", "the soup", "the dessert",
            "the steak", "the pizza", "the coffee", "the fish", "the breakfast",
            "the salad", "the chicken",
        ],
        "pos_adj": ["delicious", "fresh", "tasty", "perfectly cooked", "flavorful"],
        "neg_adj": ["bland", "cold", "greasy", "overcooked", "too salty"],
        "pos_end": [
            "we will definitely come back", "i would eat here again",
            "the place deserves its reputation", "we left very happy",
        ],
        "neg_end": [
            "we will not be back", "i left hungry and annoyed",
            "i would not eat here again", "the evening was ruined",
        ],
    },
    "movie": {
        "subjects": [
            "the plot", "the acting", "the soundtrack", "the ending",
            "the script", "the story", "the cinematography",
            "this sequel", "the dialogue", "the pacing", "the finale",
            "the final battle",
        ],
        "pos_adj": ["gripping", "moving", "clever", "memorable", "beautiful"],
        "neg_adj": ["boring", "predictable", "confusing", "dull", "forgettable"],
        "pos_end": [
            "i would watch it again", "i was smiling the whole time",
            "it stayed with me for days", "go see it in a theater",
        ],
        "neg_end": [
            "i almost walked out", "i checked my phone the whole time",
            "i want those two hours back", "skip this one",
        ],
    },
}
POS_ADJ = ["great", "wonderful", "excellent", "fantastic", "impressive", "lovely", "superb"]
NEG_ADJ = ["terrible", "awful", "disappointing", "mediocre", "poor", "dreadful", "frustrating"]
ADVERBS = ["really", "truly", "genuinely", "surprisingly", "quite", "absolutely", "pretty"]
OPENERS = ["", "", "honestly, ", "to be fair, ", "overall, ", "i have to say "]


def _review(rng: random.Random, answer: str) -> str:
    """One review sentence whose sentiment is ``answer``."""
    dom = DOMAINS[rng.choice(sorted(DOMAINS))]
    pos = answer == "positive"

    def adj(positive: bool) -> str:
        return rng.choice((POS_ADJ + dom["pos_adj"]) if positive else (NEG_ADJ + dom["neg_adj"]))

    def end(positive: bool) -> str:
        return rng.choice(dom["pos_end"] if positive else dom["neg_end"])

    subj, other = rng.sample(dom["subjects"], 2)
    adv, opener = rng.choice(ADVERBS), rng.choice(OPENERS)
    kind = rng.choice(["plain", "plain_end", "negation", "not_bad", "contrast", "turned_out", "expected"])
    if kind == "plain":
        return f"{opener}{subj} was {adv} {adj(pos)} and {other} was {adj(pos)}."
    if kind == "plain_end":
        return f"{opener}{subj} was {adv} {adj(pos)}, {end(pos)}."
    if kind == "negation":
        # "not <opposite word>" carries the sentiment.
        return f"{opener}{subj} was not {adj(not pos)} at all, {end(pos)}."
    if kind == "not_bad":
        if pos:
            return f"{opener}{subj} was not bad at all, {end(True)}."
        return f"{opener}{subj} was not {rng.choice(['great', 'good', 'very good', 'worth it'])}, {end(False)}."
    if kind == "contrast":
        # The first clause has the opposite polarity; the clause after "but" decides.
        return f"{opener}{subj} was {adj(not pos)} but {other} was {adv} {adj(pos)}."
    if kind == "turned_out":
        return f"{subj} seemed {adj(not pos)} at first, but it turned out {adv} {adj(pos)}."
    # "expected": the expectation is overturned.
    return f"i expected {subj} to be {adj(not pos)}, but it was {adv} {adj(pos)}."


# ----------------------------------------------------------------------- topic

TOPICS = {
    "sports": {
        "subjects": [
            "the local football club", "the national basketball team",
            "a veteran tennis player", "the young striker", "the hockey team",
            "the olympic swimmer", "the rugby squad", "the visiting cricket side",
            "the star goalkeeper", "the marathon champion",
        ],
        "events": [
            "won the championship final", "suffered a surprising defeat",
            "signed a new three year contract", "set a new league record",
            "advanced to the next round of the tournament",
            "announced retirement after a long career",
            "celebrated a dramatic comeback victory",
            "was injured during training",
        ],
        "times": [
            "on saturday", "last night", "this season", "after extra time",
            "in front of a packed stadium", "according to the coach",
        ],
    },
    "food": {
        "subjects": [
            "a new bakery downtown", "the famous pizza restaurant", "a local chef",
            "the weekend farmers market", "a popular food truck",
            "the city's oldest noodle shop", "a family run cafe",
            "the new vegan restaurant", "a small chocolate maker",
            "the seafood restaurant by the harbor",
        ],
        "events": [
            "launched a new seasonal menu", "earned its first michelin star",
            "started selling homemade dumplings", "raised the price of its pastries",
            "hosted a free cooking class", "began serving locally grown vegetables",
            "won a prize for its sourdough bread", "introduced a spicy ramen dish",
        ],
        "times": [
            "this week", "on monday", "after months of planning",
            "ahead of the holidays", "according to the owner", "for the summer",
        ],
    },
    "science": {
        "subjects": [
            "researchers at the university", "a team of scientists",
            "an international research group", "scientists in japan",
            "a laboratory in germany", "experts at the national institute",
            "a team of astronomers", "biologists in brazil",
        ],
        "events": [
            "published new findings on how bees navigate",
            "announced a breakthrough in quantum computing",
            "discovered a distant planet orbiting two stars",
            "identified genes linked to aging",
            "reported a new way to capture carbon from the air",
            "found a new species of deep sea fish",
            "measured the fastest rise in ocean temperatures",
            "tested a promising vaccine in early trials",
        ],
        "times": [
            "this week", "on tuesday", "in a new study",
            "in the journal nature", "after years of experiments",
            "according to a press release",
        ],
    },
}
TOPIC_TEMPLATES = [
    "{subject} {event} {time}.",
    "{time}, {subject} {event}.",
    "reports say {subject} {event} {time}.",
]


def _topic(rng: random.Random, answer: str) -> str:
    """One news-style sentence about ``answer``."""
    words = TOPICS[answer]
    return rng.choice(TOPIC_TEMPLATES).format(
        subject=rng.choice(words["subjects"]),
        event=rng.choice(words["events"]),
        time=rng.choice(words["times"]),
    )


GENERATORS: dict[str, Callable[[random.Random, str], str]] = {
    "reviews": _review,
    "topic": _topic,
}

# ----------------------------------------------------------------------- build


def build_splits(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """Return ``{"train": rows, "valid": rows, "test": rows}``; rows are shuffled across tags."""
    rng = random.Random(seed)
    seen: set[str] = set()  # dedupe by text across every tag and split
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in SPLIT_NAMES}
    for tag in sorted(GENERATORS):
        counts = PER_ANSWER[tag]
        for answer in ANSWERS[tag]:
            texts: list[str] = []
            attempts = 0
            while len(texts) < sum(counts):
                attempts += 1
                if attempts > 100_000:
                    raise RuntimeError(f"word lists too small for {tag}/{answer}")
                text = GENERATORS[tag](rng, answer)
                if text in seen or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                    continue
                seen.add(text)
                texts.append(text)
            start = 0
            for name, n in zip(SPLIT_NAMES, counts):
                splits[name] += [
                    {"prompt_tag": tag, "text": t, "answer": answer} for t in texts[start : start + n]
                ]
                start += n
    for name in SPLIT_NAMES:
        rng.shuffle(splits[name])
    return splits


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "data",
        help="output directory (default: examples/data next to this script)",
    )
    args = parser.parse_args()
    for name, rows in build_splits().items():
        path = args.out / f"{name}.jsonl"
        write_jsonl(path, rows)
        print(f"wrote {len(rows):4d} rows to {path}")


if __name__ == "__main__":
    main()
