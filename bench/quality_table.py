"""The recipe table of docs/benchmarks.md, rendered from committed bench/quality.py results (no model runs).

    python bench/quality_table.py                       # the committed files below
    python bench/quality_table.py bench/results/x.json  # any others

Each row: the task, the row's name and `ptcli tune` flags, its accuracy on the scored val file,
its steps and kept step, and its dev accuracy at each validation (the curve it was kept by).
A test keeps docs/benchmarks.md equal to this output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = {"peft": "prompt tuning", "peft_ptuning": "P-tuning", "peft_prefix": "prefix tuning", "peft_lora": "LoRA r8"}
COMMITTED = [  # RTE's rows, then SST-2's
    "quality_late_rte.json",
    "quality_deep_rte.json",
    "quality_deep_rte_lr001.json",
    "quality_deep_control_rte.json",
    "quality_deep_ema_rte.json",
    "quality_peers_rte.json",
    "quality_deep_sst2.json",
    "quality_sst2_20min_2cores.json",
    "quality_peers_sst2.json",
]


def table(paths: list[Path]) -> str:
    md = [
        "| task | row | flags | val accuracy | steps (kept) | dev accuracy by validation |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    seen = set()  # (task, row) of the rows every file repeats: majority, once a task
    for path in paths:
        results = json.loads(path.read_text(encoding="utf-8"))
        for task in [t for t in ("SST2", "RTE") if t in results]:
            for name, r in results[task].items():
                if name == "majority" and (task, name) in seen:
                    continue
                seen.add((task, name))
                plain = "class ratio of val" if name == "majority" else "the defaults"
                flags = " ".join(r.get("recipe", [])) or plain
                curve = " ".join(f"{a:.3f}" for _, a in r.get("dev_curve", []))
                kept = f"{r.get('steps', 0)} ({r['best_step']})" if "best_step" in r else str(r.get("steps", 0))
                if name.startswith("peft") and "lr" in r:  # a peer: PEFT's method at its own learning rate
                    flags = f"PEFT {PEERS.get(name, name)}, lr {r['lr']:g}"
                shown = f"`{flags}`" if name.startswith("ptcli") else flags
                md.append(f"| {task} | {name} | {shown} | {r['val_acc']:.3f} | {kept} | {curve} |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    args = ap.parse_args()
    files = args.files or [ROOT / "bench" / "results" / f for f in COMMITTED]
    print(table([f for f in files if f.is_file()]), end="")


if __name__ == "__main__":
    main()
