"""The torch path against `--engine llama.cpp` (its GGUF file, and `--llama-weights bf16`): same bank, rows, batches.

    python bench/engines.py                    # tunes the prompts (~10 min), runs; bench/results/engines.json
    python bench/engines.py --project DIR      # a project that already holds the tags below
    python bench/engines.py --table            # print the tables of the committed JSON (docs/engines.md has them)

The project is the default base with four prompts tuned briefly (`--max-minutes`): the example
tasks `reviews` and `topic` (examples/data) and SST2 and RTE (their train files less 64 rows kept
for validation). Agreement only needs prompts that steer the model, not the best prompts. Each
(engine, file) is one worker process: it loads the engine, answers the file in the plan `ptcli
infer` makes (rows of a pass sorted by length, batches of --batch-size, every engine alike), and
reports rows/s over the answering alone, the load time and its peak RSS. Files: the example test
file (mixed tags), SST-2's val_sentences and RTE's val, in each tag's default mode (rank), and
the example file in generate mode. Agreement is the share of rows whose answers are the torch path's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datadir
from speed import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"
ENGINES = ("torch", "llama.cpp", "llama.cpp-bf16")  # llama.cpp on the GGUF file, and on its bf16 re-encoding


def files(data: Path) -> dict[str, tuple[Path, str]]:
    """Row set -> (jsonl file, mode)."""
    return {
        "examples": (EXAMPLES / "test.jsonl", "rank"),
        "examples_generate": (EXAMPLES / "test.jsonl", "generate"),
        "SST2 val_sentences": (data / "SST2" / "val_sentences.jsonl", "rank"),
        "RTE val": (data / "RTE" / "val.jsonl", "rank"),
    }


def setup(root: Path, data: Path, minutes: float) -> None:
    """Init the project and tune the four tags (skipping those it already has)."""
    ptcli = [sys.executable, "-m", "ptcli"]
    if not (root / "ptcli.json").exists():
        subprocess.run([*ptcli, "init", str(root), "--num-prompt-tokens", "16", "-q"], check=True)
    work = root.parent
    tasks = {
        "reviews": (EXAMPLES / "train.jsonl", EXAMPLES / "valid.jsonl", "is this review positive or negative"),
        "topic": (EXAMPLES / "train.jsonl", EXAMPLES / "valid.jsonl", "what is the topic of this news"),
    }
    for task in ("SST2", "RTE"):
        lines = (data / task / "train.jsonl").read_text().splitlines()
        (work / f"{task}-train.jsonl").write_text("\n".join(lines[:-64]) + "\n")
        (work / f"{task}-valid.jsonl").write_text("\n".join(lines[-64:]) + "\n")
        tasks[task] = (work / f"{task}-train.jsonl", work / f"{task}-valid.jsonl", "")
    for tag, (train, valid, text) in tasks.items():
        if (root / "bank" / f"{tag}.safetensors").exists():
            continue
        rows = [r for r in map(json.loads, train.read_text().splitlines()) if r["prompt_tag"] == tag]
        mine = work / f"{tag}-only-train.jsonl"
        mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
        vrows = [r for r in map(json.loads, valid.read_text().splitlines()) if r["prompt_tag"] == tag]
        vmine = work / f"{tag}-only-valid.jsonl"
        vmine.write_text("".join(json.dumps(r) + "\n" for r in vrows))
        flags = ["--max-minutes", str(minutes), "--max-steps", "1000", "--val-check-interval", "20"]
        flags += ["--init-text", text] if text else ["--init", "labels"]
        cmd = [*ptcli, "tune", "--tag", tag, "--train", str(mine), "--valid", str(vmine), *flags, "-p", str(root), "-q"]
        subprocess.run(cmd, check=True)


def worker(engine: str, project: Path, path: Path, mode: str, batch_size: int, out: Path) -> None:
    """One engine on one file, timed as `ptcli infer` answers it (the plan of infer.infer)."""
    from ptcli.config import BaseOptions
    from ptcli.enums import Backend, LlamaWeights, Mode
    from ptcli.inference.engine import Item, Prompt
    from ptcli.inference.infer import open_engine, plan, records_of, tag_modes
    from ptcli.project import bank
    from ptcli.project import manifest as proj

    p = proj.load(project)
    t0 = time.perf_counter()
    name, _, weights = engine.partition("-")
    base = BaseOptions(engine=Backend(name), llama_weights=LlamaWeights(weights or "file"))
    eng = open_engine(p, base, 1, "cpu", lambda _: None)
    loaded = time.perf_counter() - t0
    records = records_of(path)
    modes = tag_modes(p, sorted({r.tag for r in records}), mode, None)
    prompts = {t: Prompt.of(t, *bank.get(p, t, numpy=name != "torch")) for t in modes}  # as `ptcli infer` loads them
    items = [Item(prompts[r.tag], r.text, Mode(mode), 32, tuple(prompts[r.tag].record.choices or ())) for r in records]
    seqs = [s for s in eng.rows(items) if isinstance(s, list)]
    answers: dict[int, str] = {}
    t0 = time.perf_counter()
    for idx in plan(eng, items, seqs, batch_size):
        answers.update((i, a.text) for i, a in zip(idx, eng.run([items[i] for i in idx], [seqs[i] for i in idx])))
    seconds = time.perf_counter() - t0
    predictions = [answers[i] for i in range(len(records))]
    correct = sum(pr == (r.answer or "").strip() for pr, r in zip(predictions, records))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec, so a worker
    # reported at least its parent's size (the llama.cpp rows of 2026-12-02 did: 691-709 MiB)
    peak = peak_rss_mb()
    result = {"rows": len(records), "seconds": seconds, "rows_per_s": len(records) / seconds, "load_s": loaded}
    result.update(accuracy=correct / len(records), peak_rss_mib=peak, predictions=predictions)
    out.write_text(json.dumps(result))


def table(results: dict) -> str:
    lines = [
        "| rows | mode | n | engine | agreement with torch | accuracy | rows/s | peak RSS MiB |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["runs"].items():
        for engine in [e for e in ENGINES if e in r]:
            e = r[engine]
            agree = "" if engine == "torch" else f"{r['agreement'][engine]:.3f}"
            lines.append(
                f"| {name.removesuffix('_generate')} | {r['mode']} | {e['rows']} | {engine} | {agree} | "
                f"{e['accuracy']:.3f} | {e['rows_per_s']:.1f} | {e['peak_rss_mib']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    datadir.add_flag(ap)
    ap.add_argument("--project", type=Path, help="a project holding reviews, topic, SST2 and RTE (else a temp one)")
    ap.add_argument("--max-minutes", type=float, default=2.5, help="tuning time of each tag")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engines.json")
    ap.add_argument("--table", action="store_true", help="print the tables of --out and stop")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        engine, project, path, mode, out = args.worker
        return worker(engine, Path(project), Path(path), mode, args.batch_size, Path(out))
    if args.table:
        return print(table(json.loads(args.out.read_text())))
    needed = ["SST2/train.jsonl", "SST2/val_sentences.jsonl", "RTE/train.jsonl", "RTE/val.jsonl"]
    data = datadir.check(args.data_dir, needed)
    root = args.project or Path(tempfile.mkdtemp(prefix="ptcli-engines-")) / "proj"
    setup(root, data, args.max_minutes)
    import llama_cpp  # noqa: F401  (the extra must be there before the runs)

    from ptcli.config import BaseOptions
    from ptcli.enums import Backend, LlamaWeights
    from ptcli.inference.infer import open_engine
    from ptcli.project import manifest as proj

    bf16 = BaseOptions(engine=Backend.LLAMACPP, llama_weights=LlamaWeights.BF16)
    open_engine(proj.load(root), bf16, 1, "cpu", print)  # fingerprinted and re-encoded once, here, not in a timed run
    runs = {}
    for name, (path, mode) in files(data).items():
        got = {}
        for engine in ENGINES:
            out = root.parent / f"{engine}-{name.replace(' ', '_')}.json"
            cmd = [sys.executable, __file__, "--batch-size", str(args.batch_size), "--worker", engine, str(root)]
            subprocess.run([*cmd, str(path), mode, str(out)], check=True, env={**os.environ})
            got[engine] = json.loads(out.read_text())
        said = {e: got[e].pop("predictions") for e in ENGINES}
        agreement = {e: sum(x == y for x, y in zip(said["torch"], said[e])) / len(said[e]) for e in ENGINES[1:]}
        runs[name] = {"mode": mode, "agreement": agreement, **got}
        print(name, json.dumps(runs[name]), flush=True)
    import platform

    import llama_cpp as lc

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "llama_cpp_python": lc.__version__,
        "batch_size": args.batch_size,
        "tuning_minutes": args.max_minutes,
        "runs": runs,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
