"""Keep bench/quality.py working: its short configuration runs end to end (no accuracy or timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
METHODS = [
    "majority",
    "zero_shot",
    "few_shot",
    "peft",
    "peft_ptuning",
    "peft_prefix",
    "peft_lora",
    "probe",
    "ptcli_default",
    "ptcli_best",
]
UNRANKED = ("majority", "probe")  # no answer scores to calibrate

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (DATA / "SST2" / "train.jsonl").is_file(), reason="needs ../shared/data beside the repo")
def test_quality_bench_quick_configuration_runs(tmp_path, monkeypatch, default_cache):
    monkeypatch.setenv("PTCLI_CACHE", str(default_cache))
    out, md = tmp_path / "quality.json", tmp_path / "quality.md"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "quality.py"),
            "--quick",
            "--calibrate",
            "--recipe",
            "ptcli_x=--init labels",
            "--out",
            str(out),
            "--markdown",
            str(md),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"machine", "date", "config"} <= set(results)
    for task in ("SST2", "RTE"):
        for method in METHODS + ["ptcli_x"]:
            row = results[task][method]
            assert 0 <= row["val_acc"] <= 1, (task, method)
            assert ("val_acc_calibrated" in row) == (method not in UNRANKED), (task, method)  # every ranked method
            assert 0 <= row.get("val_acc_calibrated", 0) <= 1, (task, method)
            assert ("val_acc_phrases" in row) == (task == "SST2" and method != "probe"), (
                task,
                method,
            )  # SST-2: val_sentences first, val.jsonl too
            assert row["train_seconds"] >= 0, (task, method)
            assert isinstance(row["trainable_params"], int), (task, method)
            assert f"{task} | {method} |" in md.read_text()
    assert results["SST2"]["ptcli_x"]["recipe"] == ["--init", "labels"]
    assert results["SST2"]["ptcli_default"]["infer_mode"] == "rank"  # infer's default for a closed answer set
    assert "val_acc" in r.stdout and "peft_lora" in r.stdout  # the table is printed
    for peer in ("peft", "peft_ptuning", "peft_prefix", "peft_lora"):  # each keeps its best step, its lr beside it
        row = results["RTE"][peer]
        assert row["best_step"] in [s for s, _ in row["dev_curve"]] and row["sweep"][0]["lr"] == row["lr"]
