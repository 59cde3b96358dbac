"""`ptcli infer` on a file that mixes three tags, timed as a user runs it (the whole command).

    python bench/infer_mixed.py                # a temp project; writes bench/results/infer_mixed.json
    python bench/infer_mixed.py --project DIR --vs "env PYTHONPATH=OLD python -m ptcli" --vs-label before

The project is the default base with three prompts: SST2 and RTE (ranked answer sets) and
SENT (SST-2's whole sentences, its own prompt). The prompts are initialised from text, not
tuned: speed does not depend on their values. The file interleaves the tags' val rows. Each
measurement is one `ptcli infer` process (model load included); both modes are timed, rank
(each tag's default) and `--mode generate`. Another checkout can be timed in turn with this
one on the same project (`--vs "env PYTHONPATH=OTHER python -m ptcli" --vs-label before`), so
before and after read the same bank.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datadir

ROOT = Path(__file__).resolve().parent.parent
TAGS = {"SST2": ("SST2", "val.jsonl"), "RTE": ("RTE", "val.jsonl"), "SENT": ("SST2", "val_sentences.jsonl")}


def setup(root: Path, data: Path, n: int) -> Path:
    """A project on the default base with three prompts, and the mixed file; returns the file."""
    if not (root / "ptcli.json").exists():
        from ptcli.api import init_project
        from ptcli.config import TaskConfig
        from ptcli.data.encode import closed_answers
        from ptcli.data.jsonl import read_jsonl
        from ptcli.lm.base import load_base
        from ptcli.project import bank
        from ptcli.project.record import PromptRecord, kept_mode
        from ptcli.tuning.soft_prompt import init_prompt

        p = init_project(root, "default", 20)
        model, tok = load_base("default")
        for seed, (tag, (task, split)) in enumerate(TAGS.items()):
            choices = closed_answers(read_jsonl(str(data / task / split), training=False))
            prompt = init_prompt(model, tok, p.num_prompt_tokens, "text", " ".join(choices or []), seed)
            cfg = TaskConfig(train=str(data / task / "train.jsonl"), valid=str(data / task / split))
            bank.put(
                p,
                tag,
                prompt,
                PromptRecord(init="text", choices=choices, mode=kept_mode(choices), config=cfg.to_dict()),
            )
    mixed = root / "mixed.jsonl"
    per_tag = [_rows(data, task, split, n, tag) for tag, (task, split) in TAGS.items()]
    rows = [r for group in zip(*per_tag) for r in group]  # SST2, RTE, SENT, SST2, ...
    mixed.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return mixed


def _rows(data: Path, task: str, split: str, n: int, tag: str) -> list[dict]:
    lines = (data / task / split).read_text(encoding="utf-8").splitlines()[:n]
    return [{**json.loads(line), "prompt_tag": tag} for line in lines]


def run_infer(ptcli: str, root: Path, mixed: Path, extra: list[str]) -> float:
    """Wall seconds of one `ptcli infer` process (model load included), its output thrown away."""
    cmd = f"{ptcli} infer {shlex.quote(str(mixed))} -p {shlex.quote(str(root))} -q {' '.join(extra)} > /dev/null"
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True)
    return time.perf_counter() - t0


def table(results: dict) -> str:
    """The markdown table of a results JSON (docs/benchmarks.md holds it as printed here)."""
    timed = {k.split("_")[1] for k in results if k.endswith("_seconds") and "_all_" not in k}
    names = ["this", *sorted(timed - {"this"})]
    shown = ["this checkout" if n == "this" else n for n in names]
    head = "| mode | " + " | ".join(shown) + (f" | this / {names[1]} |" if len(names) > 1 else " |")
    lines = [head, "|" + " --- |" * (len(names) + 1 + (len(names) > 1))]
    for mode in ("rank", "generate"):
        cells = [
            f"{results[f'{mode}_{n}_seconds']:.1f} s ({results['rows'] / results[f'{mode}_{n}_seconds']:.1f} rows/s)"
            for n in names
        ]
        ratio = [f"{results[f'{mode}_ratio_this_vs_{names[1]}']:.3f}"] if len(names) > 1 else []
        lines.append(f"| {mode} | " + " | ".join(cells + ratio) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-per-tag", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--project", type=Path, help="project directory to create or reuse (default: a temp dir)")
    ap.add_argument(
        "--vs",
        help="another way to run ptcli (e.g. 'env PYTHONPATH=../old python -m ptcli'), "
        "timed in turn with this checkout on the same project",
    )
    ap.add_argument("--vs-label", default="other", help="the name --vs gets in the table and the JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "infer_mixed.json")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    datadir.add_flag(ap)
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())), end="")
        return
    data = datadir.check(args.data_dir, [f"{t}/{s}" for t, s in TAGS.values()])
    tmp = None if args.project else tempfile.TemporaryDirectory()
    root = (args.project or Path(tmp.name) / "p").resolve()  # type: ignore[union-attr]
    mixed = setup(root, data, args.rows_per_tag)
    n = len(mixed.read_text().splitlines())
    tools = {"this": f"{shlex.quote(sys.executable)} -m ptcli", **({args.vs_label: args.vs} if args.vs else {})}
    results: dict = {"rows": n, "tags": len(TAGS), "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    print(f"{'mode':<10}{'ptcli':<10}{'seconds':>10}{'rows/s':>10}   ({n} rows, {len(TAGS)} tags, one process each)")
    for mode, extra in (("rank", []), ("generate", ["--mode", "generate", "--tokens-to-generate", "3"])):
        walls: dict[str, list[float]] = {name: [] for name in tools}
        for _ in range(args.reps):  # in turn, so drifting machine load hits both alike
            for name, ptcli in tools.items():
                walls[name].append(run_infer(ptcli, root, mixed, extra))
        for name, xs in walls.items():
            results[f"{mode}_{name}_seconds"] = statistics.median(xs)
            results[f"{mode}_{name}_all_seconds"] = xs
            print(f"{mode:<10}{name:<10}{statistics.median(xs):>10.2f}{n / statistics.median(xs):>10.1f}")
        if args.vs:
            ratios = [a / b for a, b in zip(walls["this"], walls[args.vs_label])]
            results[f"{mode}_ratio_this_vs_{args.vs_label}"] = statistics.median(ratios)
            print(f"{mode:<10}{'ratio':<10}{statistics.median(ratios):>10.3f}   (this / {args.vs_label}, pair by pair)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
