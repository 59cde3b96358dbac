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
        "infer_llamacpp_vs_torch_ratio_p20",
        "infer_llamacpp_bf16_vs_torch_rss_ratio_p20",
    ):
        assert results[key] > 0, key
    assert "train_ratio_p20" in r.stdout  # the table is printed
    served = {(run["engine"], run["concurrency"]): run for run in results["serve_engines"]["runs"]}
    assert set(served) == {(e, c) for e in ("torch", "llama.cpp", "llama.cpp-bf16") for c in (1, 8, 32)}
    assert all(run["req_per_s"] > 0 and run["peak_rss_mb"] > 0 for run in served.values())


@pytest.mark.skipif(not (DATA / "SST2" / "train.jsonl").is_file(), reason="needs ../shared/data beside the repo")
def test_a_section_run_keeps_the_other_rows_and_records_its_own_machine(tmp_path, monkeypatch, default_cache):
    monkeypatch.setenv("PTCLI_CACHE", str(default_cache))
    out = tmp_path / "speed.json"
    earlier = {"machine": "an earlier machine", "date": "2026-01-01", "batch": 16, "train_ratio_p20": 1.5}
    out.write_text(json.dumps(earlier))
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--quick", "--sections", "infer", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {k: results[k] for k in earlier} == earlier
    assert set(results["sections"]) == {"infer"} and results["sections"]["infer"]["matmul_gflops"] > 0
    assert results["infer_ratio_p20"] > 0


def _serve_bench(base, out, *flags: str) -> subprocess.CompletedProcess:
    """bench/serve.py --quick on `base`, its JSON into `out`; it must succeed."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", *flags, "--base", str(base), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_serve_bench_quick_configuration_runs(tmp_path, tiny_llama):
    out = tmp_path / "serve.json"
    r = _serve_bench(tiny_llama, out)
    results = json.loads(out.read_text())
    assert [(x["batching"], x["concurrency"]) for x in results["runs"]] == [
        (b, c) for b in ("on", "off") for c in (1, 8, 32)
    ]
    assert all(x["requests"] >= x["concurrency"] and x["req_per_s"] > 0 for x in results["runs"])
    assert (
        results["runs"][3]["mean_batch"] == 1.0 and results["runs"][2]["mean_batch"] > 1
    )  # off: one row a pass; on: shared
    assert "| batching | clients |" in r.stdout


def test_serve_bench_under_change_adds_its_row(tmp_path, tiny_llama):
    out = tmp_path / "serve.json"
    out.write_text(json.dumps({"runs": ["an earlier batching table"]}))
    r = _serve_bench(tiny_llama, out, "--sections", "under-change")
    results = json.loads(out.read_text())
    assert results["runs"] == ["an earlier batching table"]  # kept
    row = results["under_change"]
    wrong = ("5xx", "other_errors", "mismatches", "dropped_404_before_removal", "dropped_answered_after_removal")
    assert {k: row[k] for k in wrong} == dict.fromkeys(wrong, 0)
    assert row["dropped_404_after_removal"] > 0 and row["dropped_200_before_removal"] > 0
    assert (
        row["requests"] >= 32
        and row["rss_mb_end"] > 0
        and list(row["changes_s"]) == ["overwrite 1", "overwrite 2", "remove"]
    )
    assert "| clients | seconds | requests |" in r.stdout


def test_probe_finds_a_label_the_features_carry(tmp_path, tiny_llama):
    """bench/probe.py on a task whose label is the first word: the probe must separate val."""
    import random

    rng = random.Random(0)
    words = ["the", "film", "story", "actors", "music", "plot", "scene", "end"]
    (tmp_path / "RTE").mkdir()
    for split, n in (("train", 48), ("val", 24)):
        rows = []
        for i in range(n):
            label = i % 2 == 0
            text = ("good " if label else "bad ") + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
            rows.append({"prompt_tag": "RTE", "text": text, "answer": "True" if label else "False"})
        (tmp_path / "RTE" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "probe.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "probe.py"), "--base", str(tiny_llama), "--data-dir", str(tmp_path)]
        + ["--layer-stride", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rte = json.loads(out.read_text())["RTE"]
    assert (rte["train_rows"], rte["val_rows"], rte["val_majority"]) == (48, 24, 0.5)
    assert max(f["val_acc"] for f in rte["fits"]) == 1.0
    assert "| RTE | 48 | 0.500 |" in r.stdout


@pytest.mark.skipif(not (DATA / "SST2" / "train.jsonl").is_file(), reason="needs ../shared/data beside the repo")
def test_mixed_infer_bench_runs(tmp_path, default_cache):
    out = tmp_path / "infer_mixed.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "infer_mixed.py"),
            "--rows-per-tag",
            "4",
            "--reps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PTCLI_CACHE": str(default_cache), "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["rows"] == 12 and results["tags"] == 3
    assert results["rank_this_seconds"] > 0 and results["generate_this_seconds"] > 0
    assert "rows/s" in r.stdout  # the table is printed


def test_the_docs_table_of_mixed_infer_is_the_committed_json() -> None:
    """docs/benchmarks.md shows bench/results/infer_mixed.json as `infer_mixed.py --table` renders it."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "infer_mixed.py"), "--table"], capture_output=True, text=True, check=True
    )
    assert r.stdout.count("\n") == 4 and r.stdout in (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")


def test_the_docs_recipe_table_is_the_committed_json() -> None:
    """docs/benchmarks.md shows the late and deep prompt runs as `quality_table.py` renders their committed JSON."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality_table.py")], capture_output=True, text=True, check=True
    )
    assert r.stdout.count("\n") >= 3 and r.stdout in (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")


def test_the_docs_table_of_serving_under_change_is_the_committed_json() -> None:
    """docs/benchmarks.md shows bench/results/serve.json's under-change row as `serve.py --table` renders it."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--table"], capture_output=True, text=True, check=True
    )
    assert r.stdout.count("\n") == 3 and r.stdout in (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")


def test_the_docs_table_of_inference_engines_is_the_committed_json() -> None:
    """docs/benchmarks.md shows bench/results/speed.json's mixed-tag inference rows as `speed.py --infer-table` does."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--infer-table"], capture_output=True, text=True, check=True
    )
    assert r.stdout.count("\n") == 6 and r.stdout in (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")


def test_the_readme_table_of_engines_is_the_committed_json() -> None:
    """README's "Running prompts elsewhere" table is what bench/readme_engines.py makes of the results."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "readme_engines.py")], capture_output=True, text=True, check=True
    )
    assert r.stdout.count("\n") == 7 and r.stdout in (ROOT / "README.md").read_text(encoding="utf-8")


def test_engines_table_in_the_docs_is_the_committed_json() -> None:
    """docs/engines.md shows bench/results/engines.json as `engines.py --table` renders it."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engines.py"), "--table"], capture_output=True, text=True, check=True
    )
    doc = (ROOT / "docs" / "engines.md").read_text(encoding="utf-8")
    assert r.stdout.count("\n") >= 4 and all(f"  {line}" in doc for line in r.stdout.splitlines())
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--serve-table"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.count("\n") == 11 and all(f"  {line}" in doc for line in r.stdout.splitlines())


def test_distill_bench_quick_configuration_runs(default_cache):
    """bench/distill.py end to end on the default base, briefly: teacher, student and zero-shot each answer."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "distill.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PTCLI_CACHE": str(default_cache), "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("| reviews |"))
    assert row.count("|") == 12 and "x) |" in row


def test_the_docs_table_of_distill_is_the_committed_json() -> None:
    """docs/distill.md shows bench/results/distill.json as `distill.py --table` renders it."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "distill.py"), "--table"], capture_output=True, text=True, check=True
    )
    assert r.stdout.count("\n") >= 3 and r.stdout in (ROOT / "docs" / "distill.md").read_text(encoding="utf-8")
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "distill.py"), "--readme-table"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.count("\n") >= 3 and r.stdout in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.skipif(not (DATA / "RTE" / "train.jsonl").is_file(), reason="needs ../shared/data beside the repo")
def test_validation_bench_runs_and_its_validations_agree(tmp_path, monkeypatch, default_cache):
    """bench/validation.py on a few rows: the whole base and the kept states give the same metrics."""
    monkeypatch.setenv("PTCLI_CACHE", str(default_cache))
    out = tmp_path / "validation.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "validation.py"), "--rows", "8", "--again", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [x["run"] for x in runs] == ["whole base", "kept: first", "kept: again"]
    for x in runs[1:]:
        assert x["val_acc_rank"] == runs[0]["val_acc_rank"] and x["val_acc"] == runs[0]["val_acc"]
        assert x["val_loss"] == pytest.approx(runs[0]["val_loss"], rel=1e-4)
    assert "| kept: again |" in r.stdout
