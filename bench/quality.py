"""Quality of ptcli against baselines and Hugging Face PEFT prompt tuning and P-tuning, task by task.

Same model (the default SmolLM2-135M-Instruct), same data (SST-2 and RTE from --data-dir, by
default ../shared/data), every method scored by ranking the task's closed answer set (see
bench/quality_workers.py). SST-2 is scored on val_sentences.jsonl (whole sentences, like the
test set: `val_acc`) and on val.jsonl (mostly phrases: `val_acc_phrases`); RTE on val.jsonl.

    majority       the class ratio of each scored split (its most common answer's share)
    zero_shot      a written instruction per task, then the text
    few_shot       the instruction, k class-balanced training examples, then the text
    peft           PEFT prompt tuning: same prompt length, batch, lr schedule, init text and loss as ptcli
    peft_ptuning   PEFT P-tuning (P_TUNING, MLP prompt encoder): same prompt length, batches,
                   schedule and loss
    peft_prefix    PEFT prefix tuning (PREFIX_TUNING: per-layer key/value prefixes), same length
    peft_lora      PEFT LoRA, rank 8 on the attention projections: what a user would pick instead
                   Each peer has its own learning rates (--peer-lr; several: the best on val) and, like
                   ptcli, keeps its best step by the dev rows.
    probe          bench/probe.py's linear probe on the frozen model's hidden states (its JSON; an
                   optimistic bound: its L2 weight is the best of four on val)
    ptcli_default  `ptcli tune` with its default recipe, then `ptcli infer` (the tag's default mode: rank)
    ptcli_best     the same with the flags in RECIPES_BEST
    NAME           `--recipe NAME="tune flags"` adds a ptcli row with those flags (both tasks)

Trained methods stop at --max-steps or when training reaches --budget-minutes, whichever is
first (checked before each step). PEFT's clock runs over its training loop only; ptcli's
--max-minutes counts from the start of `tune` (data, model load and validations included),
so the budget favours PEFT. The last --dev-rows rows of train.jsonl are held out: PEFT and
ptcli train on the rest, and `tune` keeps its best step by validation on them, so the val
files only score. Each model-using method runs in a fresh worker process (its own memory and
threads). By default the tasks run side by side, one worker each (--threads 1 is the fair
setting); --solo runs every method alone, one after another, on all cores, as a user would.
--calibrate adds `*_calibrated` columns: the same prompts scored with contextual calibration.

    python bench/quality.py --budget-minutes 15 --threads 1   # the committed run: bench/results/quality.{json,md}
    python bench/quality.py --budget-minutes 20 --solo   # each method alone on all cores
                                                               # -> bench/results/quality_solo.{json,md}
    python bench/quality.py --quick                  # a short configuration (CI keeps it working)
    python bench/quality.py --methods ptcli_default --recipe ptcli_reparam="--reparam residual" --calibrate
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import datadir
import machine
from quality_workers import load_rows

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("peft", "peft_ptuning", "peft_prefix", "peft_lora")
METHODS = ["majority", "zero_shot", "few_shot", *PEERS, "probe", "ptcli_default", "ptcli_best"]
PEER_LRS = {  # each peer's own learning rates; with several, the row is the best of them on the first scored split
    "peft": [0.1],  # ptcli's default: the same method
    "peft_ptuning": [1e-3],  # PEFT's P-tuning guide
    "peft_prefix": [1e-2],  # PEFT's prefix-tuning example
    "peft_lora": [3e-4],  # PEFT's LoRA examples: 1e-4 .. 3e-4
}
SCORED = {
    "SST2": {"val_acc": "val_sentences", "val_acc_phrases": "val"}
}  # row key -> split; other tasks: val_acc on val
RECIPES_BEST = {  # extra `ptcli tune` flags of the ptcli_best row, per task: the best of bench/sweep.py on SST-2 val
    "SST2": ["--init", "labels"],  # class-label init, tied with the default's text init at 4 min and still improving
    "RTE": ["--init", "labels"],  # RTE's 4-minute runs learned nothing (15 steps): SST-2's choice
}


def scored(task: str) -> dict[str, str]:
    return SCORED.get(task, {"val_acc": "val"})


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_worker(kind: str, task: str, cfg: dict) -> dict:
    script = Path(__file__).with_name("quality_workers.py")
    out = subprocess.run(
        [sys.executable, str(script), kind, task, json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
        env=child_env(cfg["threads"]),
    )
    if out.returncode != 0:
        raise SystemExit(f"worker {kind} {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ptcli(task: str, recipe: list[str], cfg: dict) -> dict:
    """`ptcli init`, `tune` and `infer` (plain, and --calibrate if asked) in a temp project, through the CLI."""

    def cli(*argv) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "ptcli", *map(str, argv)],
            capture_output=True,
            text=True,
            check=False,
            env=child_env(cfg["threads"]),
            cwd=ROOT,
        )
        if out.returncode != 0:
            raise SystemExit(f"ptcli {' '.join(map(str, argv))} failed:\n{out.stderr[-3000:]}")
        return out.stdout

    with tempfile.TemporaryDirectory(prefix="ptcli-quality-") as d:
        proj, train = Path(d) / "proj", load_rows(cfg["data_dir"], task, "train")
        fit = write_rows(Path(d) / "train.jsonl", train[: -cfg["dev_rows"]])
        dev = write_rows(Path(d) / "dev.jsonl", train[-cfg["dev_rows"] :])
        length = (
            int(recipe[recipe.index("--num-prompt-tokens") + 1])
            if "--num-prompt-tokens" in recipe
            else cfg["prompt_tokens"]
        )
        cli("init", proj, "--num-prompt-tokens", length, "-q")  # a project's prompt length is set here, not by tune
        tuned = json.loads(
            cli(
                "tune",
                "-p",
                proj,
                "--tag",
                task,
                "--train",
                fit,
                "--valid",
                dev,
                "--max-steps",
                cfg["max_steps"],
                "--max-minutes",
                cfg["budget_minutes"],
                "--json",
                "-q",
                *recipe,
            )
        )
        t0, row = time.perf_counter(), {}
        for key, split in cfg["scored"].items():
            scored = write_rows(Path(d) / f"{split}.jsonl", load_rows(cfg["data_dir"], task, split, cfg["val_limit"]))
            for suffix, flags in [("", [])] + ([("_calibrated", ["--calibrate"])] if cfg["calibrate"] else []):
                doc = json.loads(cli("infer", "-p", proj, scored, "--json", "-q", *flags))
                row[key + suffix], row["infer_mode"] = doc["accuracy"][task]["accuracy"], doc["modes"][task]
        hidden = json.loads((proj / "ptcli.json").read_text())["base"]["hidden_size"]
        depth = json.loads(cli("show", "-p", proj, task, "--json"))["record"].get("depth", 1)
        log = [json.loads(line) for line in (proj / "runs" / task / "metrics.jsonl").read_text().splitlines()]
    members = int(recipe[recipe.index("--ensemble") + 1]) if "--ensemble" in recipe else 1
    headline = "val_acc_rank" if any("val_acc_rank" in r for r in log) else "val_acc"
    return {
        **row,
        "train_seconds": tuned["seconds"],
        "steps": tuned["steps"],
        "trainable_params": length * hidden * members * depth,
        "best_step": tuned["best_step"],
        "dev_curve": [(r["step"], round(r[headline], 4)) for r in log if headline in r],
        "recipe": recipe,
        "infer_seconds": time.perf_counter() - t0,
    }


def run_method(task: str, method: str, cfg: dict) -> dict:
    cfg = {**cfg, "scored": scored(task)}
    if method == "majority":  # the class ratio of each scored split: what a prompt must beat to have learned
        counts = {
            key: Counter(r["answer"] for r in load_rows(cfg["data_dir"], task, split, cfg["val_limit"]))
            for key, split in cfg["scored"].items()
        }
        return {
            **{k: c.most_common(1)[0][1] / sum(c.values()) for k, c in counts.items()},
            "train_seconds": 0.0,
            "trainable_params": 0,
            "steps": 0,
            "answer": {k: c.most_common(1)[0][0] for k, c in counts.items()},
        }
    if method in ("zero_shot", "few_shot"):
        return run_worker("prompted", task, {**cfg, "k": 0 if method == "zero_shot" else cfg["shots"]})
    if method in PEERS:
        return run_peer(task, method, cfg)
    if method == "probe":
        return probe_row(task, cfg)
    recipes = {"ptcli_default": [], "ptcli_best": RECIPES_BEST[task], **cfg["recipes"]}
    return run_ptcli(task, recipes[method], cfg)


def run_peer(task: str, method: str, cfg: dict) -> dict:
    """A peer at each of its learning rates; the row is its best on the first scored split, the sweep beside it."""
    key = next(iter(cfg["scored"]))
    runs = [run_worker(method, task, {**cfg, "lrs": {method: lr}}) for lr in cfg["peer_lrs"][method]]
    best = max(runs, key=lambda r: r[key])
    return {**best, "sweep": [{"lr": r["lr"], key: r[key], "best_step": r["best_step"]} for r in runs]}


def probe_row(task: str, cfg: dict) -> dict:
    """The linear probe of bench/probe.py (its committed JSON): the best of its L2 weights on the val file,
    an optimistic bound on what the frozen model's features hold, not a method of the same budget."""
    path = ROOT / "bench" / "results" / "probe.json"
    probe = json.loads(path.read_text()).get(task) if path.is_file() else None
    if not probe:
        return {"val_acc": float("nan"), "train_seconds": 0.0, "trainable_params": 0, "steps": 0, "missing": str(path)}
    best = max(probe["fits"], key=lambda f: f["val_acc"])
    return {
        "val_acc": best["val_acc"],
        "train_seconds": probe["feature_seconds"],
        "trainable_params": probe["features"] + 1,
        "steps": 0,
        "weight_decay": best["weight_decay"],
        "val_file": probe["val_file"],
    }


def parse_recipes(specs: list[str]) -> dict[str, list[str]]:
    """--recipe NAME="flags": extra ptcli rows, e.g. ptcli_reparam="--reparam residual"."""
    recipes = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        if not name.startswith("ptcli_") or name in METHODS or not flags.strip():
            raise SystemExit(f'error: --recipe takes NAME="tune flags" with a new NAME starting ptcli_, got {spec!r}')
        recipes[name] = shlex.split(flags)
    return recipes


def markdown(results: dict, tasks: list[str], methods: list[str]) -> str:
    keys = sorted(
        {k for t in tasks for m in methods for k in results[t][m] if k.startswith("val_acc")},
        key=lambda k: (k.endswith("_calibrated"), k != "val_acc", k),
    )  # val_acc first, calibrated last
    md = [
        "| task | method | " + " | ".join(keys) + " | train seconds | steps | trainable params |",
        "| --- | --- |" + " ---: |" * (len(keys) + 3),
    ]
    for t in tasks:
        for m in methods:
            r = results[t][m]
            accs = " | ".join(f"{r[k]:.3f}" if k in r else "" for k in keys)
            md.append(
                f"| {t} | {m} | {accs} | {r['train_seconds']:.1f} | {r.get('steps', 0)} | {r['trainable_params']:,} |"
            )
    return "\n".join(md) + "\n"


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["SST2", "RTE"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar='NAME="FLAGS"',
        help="add a ptcli row NAME (starting ptcli_) tuned with these extra `ptcli tune` flags; repeatable",
    )
    ap.add_argument("--budget-minutes", type=float, default=20.0, help="training wall-time cap of every trained method")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="PEFT prompt tuning's peak learning rate (default: ptcli's)")
    ap.add_argument(
        "--peer-lr",
        action="append",
        default=[],
        metavar="PEER=LR[,LR...]",
        help=f"a peer's peak learning rates (several: a sweep, the best on val kept); defaults {PEER_LRS}",
    )
    ap.add_argument("--shots", type=int, default=4, help="k of few_shot")
    # chat won on full val (SST2 zero/few 0.650/0.670 vs plain 0.572/0.566; RTE near chance either way)
    ap.add_argument(
        "--format", choices=["plain", "chat"], default="chat", help="zero/few-shot context: plain text or chat template"
    )
    ap.add_argument("--seed", type=int, default=0, help="which few-shot examples")
    ap.add_argument("--val-limit", type=int, default=None, help="score only the first N rows of each val file")
    ap.add_argument("--dev-rows", type=int, default=200, help="last train rows held out for `ptcli tune --valid`")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: torch's; with --solo: all cores)"
    )
    ap.add_argument(
        "--solo",
        action="store_true",
        help="run the methods one after another, each alone on all cores (as a user runs them)",
    )
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="also score every ranked method with contextual calibration (*_calibrated)",
    )
    ap.add_argument("--quick", action="store_true", help="short configuration: 0.3 min, 10 steps, 40 val rows")
    datadir.add_flag(ap)
    ap.add_argument(
        "--out", type=Path, default=None, help="default: bench/results/quality.json (quality_solo.json with --solo)"
    )
    ap.add_argument("--markdown", type=Path, default=None, help="default: --out with .md")
    args = ap.parse_args()
    if args.quick:
        args.budget_minutes, args.max_steps, args.val_limit, args.dev_rows = 0.3, 10, 40, 16
        args.threads = args.threads or (None if args.solo else 1)
    if args.solo:
        args.threads = args.threads or os.cpu_count()
    if args.lr is None:
        from ptcli.config import TaskConfig

        args.lr = TaskConfig().lr
    args.peer_lrs = dict(PEER_LRS)
    for spec in args.peer_lr:
        peer, _, lrs = spec.partition("=")
        if peer not in PEERS or not lrs:
            raise SystemExit(
                f"error: --peer-lr takes PEER=LR[,LR...] with PEER one of {', '.join(PEERS)}, got {spec!r}"
            )
        args.peer_lrs[peer] = [float(x) for x in lrs.split(",")]
    args.out = args.out or ROOT / "bench" / "results" / ("quality_solo.json" if args.solo else "quality.json")
    args.markdown = args.markdown or args.out.with_suffix(".md")
    args.data_dir = str(
        datadir.check(args.data_dir, [f"{t}/{s}.jsonl" for t in args.tasks for s in ["train", *scored(t).values()]])
    )
    return args


def main() -> None:
    args = arguments()
    recipes = parse_recipes(args.recipe)
    methods = args.methods + list(recipes)
    cfg = {k: v for k, v in vars(args).items() if k not in ("out", "markdown", "recipe", "peer_lr")} | {
        "recipes": recipes
    }
    results: dict = {
        "machine": machine.describe(args.threads)
        | {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": version("torch"),
            "peft": version("peft"),
        },
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "config": cfg,
    }

    def run_task(task: str) -> None:
        results[task] = {}
        for method in methods:
            print(f"{task} {method} ...", file=sys.stderr, flush=True)
            r = results[task][method] = run_method(task, method, cfg)
            print(
                f"{task} {method}: val_acc {r['val_acc']:.3f}, {r['train_seconds']:.1f} s", file=sys.stderr, flush=True
            )

    with ThreadPoolExecutor(
        1 if args.solo else len(args.tasks)
    ) as pool:  # side by side, or (--solo) one method at a time
        list(pool.map(run_task, args.tasks))

    table = markdown(results, args.tasks, methods)
    print(table, end="")
    for path, text in ((args.out, json.dumps(results, indent=2) + "\n"), (args.markdown, table)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
