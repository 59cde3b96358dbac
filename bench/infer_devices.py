"""Wall time of `ptcli infer` with one process against `--devices N`, on the default model.

    nice -n 10 .venv/bin/python bench/infer_devices.py            # a few minutes on 2 idle cores
    .venv/bin/python bench/infer_devices.py --devices 4 --reps 3

One process runs with torch's default threads (every core); N processes run one thread each
(torchrun's default), so both use the whole machine. The file is examples/data/test.jsonl (140
mixed-tag rows); prompts are the text-initialised ones (`tune --max-steps 0`). Runs alternate,
medians are reported, outputs are compared. Writes bench/results/infer_devices.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def ptcli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptcli", *args], capture_output=True, text=True, check=True, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "infer_devices.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "p"
        ptcli("init", str(root), "--num-prompt-tokens", "16", "-q")
        for tag in ("reviews", "topic"):
            for split in ("train", "valid"):
                rows = [
                    line
                    for line in (DATA / f"{split}.jsonl").read_text().splitlines()
                    if f'"prompt_tag": "{tag}"' in line
                ]
                rows = rows if split == "train" else rows[:2]  # the untrained prompt's validation is not what is timed
                (Path(d) / f"{tag}-{split}.jsonl").write_text("\n".join(rows) + "\n")
            ptcli(
                "tune",
                "-p",
                str(root),
                "--tag",
                tag,
                "--train",
                f"{d}/{tag}-train.jsonl",
                "--valid",
                f"{d}/{tag}-valid.jsonl",
                "--max-steps",
                "0",
                "-q",
            )
        args = [
            "infer",
            str(DATA / "test.jsonl"),
            "-p",
            str(root),
            "--tokens-to-generate",
            "4",
            "--batch-size",
            "16",
            "-q",
        ]
        walls: dict[str, list[float]] = {"1": [], str(a.devices): []}
        outputs: dict[str, str] = {}
        for _ in range(a.reps):
            for n in walls:
                t0 = time.perf_counter()
                out = ptcli(
                    *args,
                    *(["--devices", n] if n != "1" else []),
                    env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())} if n == "1" else None,
                ).stdout
                walls[n].append(time.perf_counter() - t0)
                print(f"{n} process(es): {walls[n][-1]:.1f} s", file=sys.stderr, flush=True)
                outputs[n] = out
    one, many = statistics.median(walls["1"]), statistics.median(walls[str(a.devices)])
    result = {
        "rows": sum(1 for _ in (DATA / "test.jsonl").open()),
        "cores": os.cpu_count(),
        "devices": a.devices,
        "seconds_1_process": one,
        f"seconds_{a.devices}_processes": many,
        "speedup": one / many,
        "same_output": outputs["1"] == outputs[str(a.devices)],
        "walls": walls,
        "note": "wall time of the whole command, model loading included; "
        "the machine's cores were shared with other work",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
