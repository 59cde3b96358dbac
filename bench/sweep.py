"""Recipe sweep for ptcli's defaults, scored on the tasks' val.jsonl only (never a test set).

Each configuration is one `ptcli tune` run in a fresh project under the same wall-time
budget, on the default model, with the task's full val.jsonl as validation; the score is
the best validation accuracy of the ranked answer set (what `ptcli infer --mode rank` gives).
Runs go two at a time with one torch thread each, so every configuration sees the same
machine.

    python bench/sweep.py --budget-minutes 4 --grid lr       # lr 0.03 / 0.1 / 0.3
    python bench/sweep.py --budget-minutes 4 --grid shape --tasks SST2 --valid-rows 200 --val-every '{"SST2": 100}'
                                                             # init text / labels, prompt length 20 / 100
    python bench/sweep.py --budget-minutes 10 --grid placement --tasks RTE
                                                             # where the prompt sits, and its reparameterization
    python bench/sweep.py --budget-minutes 10 --grid rte --tasks RTE
                                                             # lr, batch size, prompt length, --max-seq-length

SST-2 is validated on val_sentences.jsonl (whole sentences, like the sets users care about).

Writes bench/results/sweep.json (every run appended under its grid) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datadir

ROOT = Path(__file__).resolve().parent.parent

GRIDS: dict[str, list[dict]] = {
    "lr": [{"lr": lr, "init": "labels"} for lr in (0.03, 0.1, 0.3)],
    "shape": [
        {"lr": 0.1, "init": "labels"},
        {"lr": 0.1, "init": "text"},
        {"lr": 0.1, "init": "labels", "prompt_tokens": 100},
        {"lr": 0.3, "init": "labels", "prompt_tokens": 100},
    ],
    "placement": [
        {"lr": 0.1, "init": "text", "template": t, "reparam": r}
        for t, r in (
            ("prefix", "none"),
            ("suffix", "none"),
            ("{text}\nAnswer:{prompt}{answer}", "none"),
            ("{prompt:10}{text}{prompt}{answer}", "none"),
            ("suffix", "residual"),
            ("suffix", "mlp"),
            ("prefix", "residual"),
        )
    ],
    "rte": [
        {"lr": lr, "init": "text", "template": "suffix", "batch_size": b, "prompt_tokens": n, "max_seq_length": m}
        for lr, b, n, m in (
            (0.1, 16, 20, 512),
            (0.3, 16, 20, 512),
            (0.03, 16, 20, 512),
            (0.1, 8, 20, 512),
            (0.1, 32, 20, 512),
            (0.1, 16, 10, 512),
            (0.1, 16, 50, 512),
            (0.1, 16, 20, 128),
        )
    ],
}
VAL = {"SST2": "val_sentences.jsonl"}  # every other task: val.jsonl
EXTRA = ("template", "reparam", "reparam_lr", "batch_size", "max_seq_length")  # grid keys passed as --flags


def run_one(
    data: Path, task: str, cfg: dict, budget: float, val_every: int, lr_default: float, valid_rows: int | None
) -> dict:
    flags = ["--init", cfg["init"], "--lr", str(cfg["lr"] or lr_default)]
    flags += [x for k in EXTRA if k in cfg for x in (f"--{k.replace('_', '-')}", str(cfg[k]))]
    with tempfile.TemporaryDirectory(prefix="ptcli-sweep-") as tmp:
        proj, valid = Path(tmp) / "proj", data / task / VAL.get(task, "val.jsonl")
        if valid_rows:  # validation costs wall time inside the budget: a smaller slice of val
            valid = Path(tmp) / "valid.jsonl"
            valid.write_text(
                "".join((data / task / VAL.get(task, "val.jsonl")).read_text().splitlines(keepends=True)[:valid_rows])
            )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ptcli",
                "init",
                str(proj),
                "--num-prompt-tokens",
                str(cfg.get("prompt_tokens", 20)),
                "-q",
            ],
            check=True,
            env=env,
        )
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "ptcli",
                "tune",
                "-p",
                str(proj),
                "--tag",
                task,
                "--train",
                str(data / task / "train.jsonl"),
                "--valid",
                str(valid),
                "--max-steps",
                "100000",
                "--max-minutes",
                str(budget),
                "--val-check-interval",
                str(val_every),
                *flags,
                "--json",
                "-q",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode:
            raise SystemExit(f"{task} {cfg}: {r.stderr[-2000:]}")
        out = json.loads(r.stdout)
        curve = [json.loads(line) for line in (proj / "runs" / task / "metrics.jsonl").read_text().splitlines()]
    return {
        "task": task,
        **cfg,
        "lr": cfg["lr"] or lr_default,
        "val_acc_rank": out["metrics"].get("val_acc_rank"),
        "val_acc": out["metrics"]["val_acc"],
        "initial_val_acc_rank": out["initial_metrics"].get("val_acc_rank"),
        "best_step": out["best_step"],
        "steps": out["steps"],
        "seconds": round(out["seconds"], 1),
        "curve": [{k: h[k] for k in ("step", "val_acc_rank", "val_loss") if k in h} for h in curve if "val_loss" in h],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), required=True)
    ap.add_argument("--tasks", nargs="+", default=["SST2", "RTE"])
    ap.add_argument("--budget-minutes", type=float, default=4.0)
    ap.add_argument(
        "--val-every",
        type=json.loads,
        default={"SST2": 50, "RTE": 15},
        help="steps between validations, per task (JSON)",
    )
    ap.add_argument("--lr", type=float, default=0.1, help="lr for grids that do not sweep it")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--valid-rows", type=int, default=None, help="validate on the first N val rows only")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep.json")
    datadir.add_flag(ap)
    args = ap.parse_args()
    data = datadir.check(
        args.data_dir, [f"{t}/{s}" for t in args.tasks for s in ("train.jsonl", VAL.get(t, "val.jsonl"))]
    )

    jobs = [(task, cfg) for cfg in GRIDS[args.grid] for task in args.tasks]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(
            pool.map(
                lambda j: run_one(
                    data, j[0], j[1], args.budget_minutes, args.val_every[j[0]], args.lr, args.valid_rows
                ),
                jobs,
            )
        )
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc[args.grid] = {
        "date": dt.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "budget_minutes": args.budget_minutes,
        "threads_per_run": 1,
        "valid_rows": args.valid_rows,
        "val_every": args.val_every,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        "| task | init | lr | P | other | val_acc_rank | val_acc | steps | best step | seconds |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in runs:
        other = " ".join(f"{k}={r[k]}" for k in EXTRA if k in r)
        print(
            f"| {r['task']} | {r['init']} | {r['lr']} | {r.get('prompt_tokens', 20)} | {other} "
            f"| {r['val_acc_rank']:.3f} | {r['val_acc']:.3f} "
            f"| {r['steps']} | {r['best_step']} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
