"""What one validation of a late prompt costs: through the whole base, and from the rows' kept states.

A deep prompt entering before block 15 (RTE's recipe row in docs/benchmarks.md: the suffix
layout, --loss choices) is scored on the last 200 rows of RTE's train.jsonl, as `ptcli tune`
validates it: once through the whole base (`validate.evaluate`, what every validation cost
before), then from kept states (`validate.evaluate_kept`): the first time computes and keeps
each row's states below block 15 and its text's keys and values, later times reuse them.
The metrics of the three are printed beside their seconds (they must agree).

    python bench/validation.py              # about 3 min on 2 cores; bench/results/validation.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import datadir

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--rows", type=int, default=200, help="the last N rows of RTE's train.jsonl")
    ap.add_argument("--again", type=int, default=3, help="validations from the kept states after the first")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "validation.json")
    datadir.add_flag(ap)
    args = ap.parse_args()
    data = datadir.check(args.data_dir, ["RTE/train.jsonl"])

    import torch

    from ptcli.data.encode import answer_tokens, closed_answers, encode
    from ptcli.data.jsonl import read_jsonl
    from ptcli.lm.base import load_base
    from ptcli.lm.depth import depth_of, entering
    from ptcli.lm.frozen import lifted
    from ptcli.tuning.soft_prompt import init_prompt
    from ptcli.tuning.states import FrozenStates
    from ptcli.tuning.task import Task
    from ptcli.tuning.validate import evaluate, evaluate_kept

    class One:  # one process: validate's reductions are the identity
        process_index, num_processes, device = 0, 1, "cpu"

        def reduce(self, t, op):
            return t

    model, tok = load_base("default")
    rows = read_jsonl(str(data / "RTE" / "train.jsonl"), training=True)[-args.rows :]
    P, depth = 20, depth_of(model, args.layer, True)
    enc = encode(tok, rows, P, 512, True, template="suffix")
    choices = closed_answers(rows)
    cfg = argparse.Namespace(answer_only=True)
    task = Task("RTE", cfg, enc, enc, choices, "", [0], answer_tokens(tok, choices))  # type: ignore[arg-type]
    init = init_prompt(model, tok, P, "text", "True or False?", 0)
    prompts = lifted(model, args.layer, init, depth)[None]  # (1, D*P, H)
    states = FrozenStates(model, args.layer, 1 << 34)
    runs = []
    with torch.no_grad(), entering(model, args.layer, depth):
        for name in ["whole base", "kept: first"] + ["kept: again"] * args.again:
            t0 = time.perf_counter()
            if name == "whole base":
                metrics = evaluate(model, tok, prompts, task, 16, One())
            else:
                metrics = evaluate_kept(model, prompts, task, states, args.layer, depth, 16, One())
            runs.append({"run": name, "seconds": time.perf_counter() - t0, **metrics})
    again = [r["seconds"] for r in runs if r["run"] == "kept: again"]
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "config": {"layer": args.layer, "depth": depth, "prompt_tokens": P, "rows": args.rows, "template": "suffix"},
        "kept_bytes": states.bytes,
        "runs": runs,
        "whole_vs_kept_ratio": runs[0]["seconds"] / (sum(again) / len(again)) if again else None,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| validation | seconds | val_acc_rank | val_acc | val_loss |\n| --- | ---: | ---: | ---: | ---: |")
    for r in runs:
        scores = f"{r['val_acc_rank']:.3f} | {r['val_acc']:.3f} | {r['val_loss']:.4f}"
        print(f"| {r['run']} | {r['seconds']:.1f} | {scores} |")
    print(f"kept in memory: {states.bytes / 2**20:.0f} MiB; wrote {args.out}")


if __name__ == "__main__":
    main()
