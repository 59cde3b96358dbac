"""Where the benchmarks read their data: `--data-dir`, by default ../shared/data beside the repo.

The folder holds TASK/train.jsonl and TASK/val.jsonl (and SST2/val_sentences.jsonl) per task,
as described in ../shared/data/README.md; scripts/fetch_glue.py writes the same files from GLUE.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT.parent / "shared" / "data"


def add_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT,
        help="folder with SST2/ and RTE/ jsonl files (default: ../shared/data beside the repo; "
        "scripts/fetch_glue.py makes one)",
    )


def check(data_dir: Path, files: list[str]) -> Path:
    """The folder, absolute, once every file the run reads is there; else exit naming what is missing."""
    data_dir = data_dir.resolve()
    missing = [f for f in files if not (data_dir / f).is_file()]
    if missing:
        raise SystemExit(
            f"error: {data_dir} lacks {', '.join(missing)}\n"
            f"hint: pass --data-dir DIR, or write DIR with `python scripts/fetch_glue.py --out DIR` "
            f"(needs `pip install datasets` and network access)"
        )
    return data_dir
