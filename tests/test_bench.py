"""Keep bench/speed.py and bench/serve.py working: their short configurations run end to end (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (DATA / "SST2" / "train.jsonl").is_file(), reason="needs ../shared/data beside the repo")
def test_speed_bench_quick_configuration_runs(tmp_path, monkeypatch, default_cache):
    monkeypatch.setenv("PTCLI_CACHE", str(default_cache))
    out = tmp_path / "speed.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in (
        "train_ratio_p20",
        "infer_ratio_p20",
        "train_peak_fraction",
        "rss_ratio",
        "list_tags_seconds",
        "suffix_vs_prefix_ratio_RTE",
        "suffix_vs_peft_ratio_SST2",
    ):
        assert results[key] > 0, key
    assert "train_ratio_p20" in r.stdout  # the table is printed


def test_serve_bench_quick_configuration_runs(tmp_path, tiny_llama):
    out = tmp_path / "serve.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--base", str(tiny_llama), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(x["batching"], x["concurrency"]) for x in results["runs"]] == [
        (b, c) for b in ("on", "off") for c in (1, 8, 32)
    ]
    assert all(x["requests"] >= x["concurrency"] and x["req_per_s"] > 0 for x in results["runs"])
    assert (
        results["runs"][3]["mean_batch"] == 1.0 and results["runs"][2]["mean_batch"] > 1
    )  # off: one row a pass; on: shared
    assert "| batching | clients |" in r.stdout
