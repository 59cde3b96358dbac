"""Soak: SIGKILL `ptcli tune` at random moments, relaunch the same command each time, compare with an uninterrupted run.

    nice -n 10 .venv/bin/python bench/soak.py            # >= 110 kills, about 10 min on 2 busy cores
    .venv/bin/python bench/soak.py --kills 10            # a quick look

Every launch runs `ptcli tune ... --auto-resume` (the job script's command) on a tiny random
Llama built like the tests' fixtures. A launch is killed with SIGKILL either at a random time
after training began (steps and validations), or at a chosen write: just before the rename of
the n-th checkpoint, of the metrics log, of the bank file or of the manifest, just after a temp
file's fsync, or just before the history append. After each kill the project is inspected
(every bank file, the manifest and the checkpoint must be whole), then the same command runs
again, until one launch finishes; its prompt must equal the uninterrupted run's. Then a
fresh project, until the kills reach --kills. Writes bench/results/soak.json.

Launches are forks of this process with torch, transformers and ptcli already imported (the
child runs ptcli's CLI entry point with the tune arguments and is killed like any process):
on two shared cores a fresh interpreter spends ~10 s importing, which would make 100 kills
take an hour. tests/test_reliability.py kills fresh `python -m ptcli` processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's ptcli; the tests' tiny tokenizer

import transformers  # noqa: E402,F401  (imported once, before any fork)

import ptcli.tuning.tune  # noqa: E402,F401
from ptcli.cli.app import main as ptcli_main  # noqa: E402
from ptcli.project import bank, runs, storage  # noqa: E402
from ptcli.project import manifest as proj  # noqa: E402
from ptcli.project.check import check  # noqa: E402

STEPS, EVERY = 40, 4
ROWS = [
    (f"i {v} {o}", a)
    for v, a in (("love", "positive"), ("hate", "negative"), ("adore", "positive"), ("loathe", "negative"))
    for o in ("it", "this", "the movie")
]
WRITES = ["checkpoint.safetensors", "metrics.jsonl", "soak.safetensors", "ptcli.json"]


def child(fn, *args) -> tuple[int, threading.Thread, list[str], threading.Event]:
    """Fork; the child runs fn(*args) with stderr on a pipe and exits with its code.

    Returns (pid, reader, lines, started).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        code = 1
        try:
            code = fn(*args) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001  (reported through the exit code and stderr)
            print(f"child crashed: {e!r}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        with os.fdopen(r, errors="replace") as f:
            for line in f:
                lines.append(line)
                if line.startswith(("step 0:", "resuming")):
                    started.set()  # the initial validation is done, or the checkpoint loaded: training begins
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return pid, reader, lines, started


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def make_project(where: Path) -> int:
    import torch
    from conftest import _train_tokenizer_json, make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(_train_tokenizer_json())
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )  # lively: answers depend on the prompt
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(where / "model")
    tok.save_pretrained(where / "model")
    (where / "soak.jsonl").write_text(
        "".join(json.dumps({"prompt_tag": "soak", "text": t, "answer": a}) + "\n" for t, a in ROWS)
    )
    sys.argv = ["ptcli", "init", str(where / "fresh"), "--base", str(where / "model"), "--num-prompt-tokens", "4", "-q"]
    return ptcli_main()


def tune_args(where: Path, root: Path) -> list[str]:
    data = str(where / "soak.jsonl")
    return [
        "tune",
        "-p",
        str(root),
        "--tag",
        "soak",
        "--train",
        data,
        "--valid",
        data,
        "--max-steps",
        str(STEPS),
        "--val-check-interval",
        str(EVERY),
        "--batch-size",
        "4",
        "--max-seq-length",
        "64",
        "--lr",
        "0.1",
        "--seed",
        "11",
        "--auto-resume",
    ]


def run_tune(args: list[str], kill_at: tuple[str, str, int] | None) -> int:
    """The child: ptcli's CLI, with SIGKILL planted at the n-th write of a kind to a file, if asked."""
    if kill_at:
        kind, name, n = kill_at
        seen = [0]

        def hit(path: str) -> None:
            if os.path.basename(path).startswith((name, f".{name}.")):
                seen[0] += 1
                if seen[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)

        real = {"replace": os.replace, "fsync": os.fsync, "append": os.write}[kind]
        if kind == "replace":
            os.replace = lambda src, dst, *a, **k: (hit(os.fspath(dst)), real(src, dst, *a, **k))[1]
        else:  # fsync / append: the file behind the descriptor
            setattr(
                os,
                "fsync" if kind == "fsync" else "write",
                lambda fd, *a: (hit(os.readlink(f"/proc/self/fd/{fd}")), real(fd, *a))[1],
            )
    sys.argv = ["ptcli", *args]
    return ptcli_main()


def inspect(root: Path, stats: dict) -> None:
    """After a kill: every bank file, the manifest and any checkpoint must be whole."""
    for path in sorted((root / "bank").glob("[!.]*.safetensors")):
        try:
            bank.verify(str(path), path.read_bytes())
        except Exception as e:  # noqa: BLE001
            stats["corrupted_banks"] += 1
            stats["problems"].append(f"{path}: {e}")
    try:
        proj.load(root)
    except Exception as e:  # noqa: BLE001
        stats["corrupted_manifests"] += 1
        stats["problems"].append(str(e))
    ckpt = runs.checkpoint_path(proj.load(root), "soak")
    if ckpt.exists():
        try:
            runs.verify_checkpoint(ckpt)
        except Exception as e:  # noqa: BLE001
            stats["corrupted_checkpoints"] += 1
            stats["problems"].append(str(e))
    stats["temp_files_left_by_kills"] += len(storage.temp_files(root))


def plan(rng: random.Random) -> tuple[str, object]:
    """How the next launch dies: ("timed", a fraction of an uninterrupted run's span) or ("write", (kind, file, n))."""
    if rng.random() < 0.6:
        return "timed", 0.8 * rng.random()
    name = rng.choice(WRITES + ["history.jsonl"])
    kind = "append" if name == "history.jsonl" else rng.choice(["replace", "replace", "fsync"])
    n = rng.randint(1, STEPS // EVERY) if name == "checkpoint.safetensors" else 1
    return "write", (kind, name, n)


def soak(target: int, seed: int, out: Path, workers: int) -> dict:
    """Build the project and the uninterrupted reference.

    Then `workers` processes kill and resume until `target` kills.
    """
    import torch
    from safetensors.torch import load_file

    where = Path(tempfile.mkdtemp(prefix="ptcli-soak-"))
    pid, reader, lines, _ = child(make_project, where)
    assert wait(pid) == 0, "".join(lines)
    ref = Path(shutil.copytree(where / "fresh", where / "reference"))
    pid, reader, lines, started = child(run_tune, tune_args(where, ref), None)
    started.wait()
    t0 = time.monotonic()
    assert wait(pid) == 0, "".join(lines)
    span = time.monotonic() - t0  # training, validations and writes of one uninterrupted run
    reference = load_file(ref / "bank" / "soak.safetensors")["prompt"]

    started_at = time.monotonic()
    pids = []
    for w in range(workers):
        pid = os.fork()
        if pid == 0:
            stats = episodes(where, reference, span, -(-target // workers), random.Random(seed + w), f"w{w}")
            (where / f"part-{w}.json").write_text(json.dumps(stats))
            os._exit(0)
        pids.append(pid)
    assert all(wait(pid) == 0 for pid in pids), "a soak worker failed"
    stats = merge([json.loads((where / f"part-{w}.json").read_text()) for w in range(workers)])
    stats.update(
        seconds=round(time.monotonic() - started_at, 1),
        uninterrupted_run_seconds=round(span, 2),
        steps=STEPS,
        validation_every=EVERY,
        seed=seed,
        workers=workers,
        torch=torch.__version__,
        launch="fork of a Python with torch, transformers and ptcli imported; the child runs ptcli's CLI",
    )
    shutil.rmtree(where)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def merge(parts: list[dict]) -> dict:
    total: dict = {}
    for part in parts:
        for k, v in part.items():
            if k == "max_prompt_diff":
                total[k] = max(total.get(k, 0.0), v)
            elif isinstance(v, dict):
                total[k] = {m: total.get(k, {}).get(m, 0) + part[k].get(m, 0) for m in {*total.get(k, {}), *v}}
            else:
                total[k] = total.get(k, 0 if isinstance(v, int) else []) + v
    return total


def episodes(where: Path, reference, span: float, target: int, rng: random.Random, name: str) -> dict:
    """Fresh projects, each killed and relaunched until one launch finishes, until `target` kills."""
    stats = {
        "kills": 0,
        "resumes": 0,
        "restarts": 0,
        "launches": 0,
        "episodes": 0,
        "corrupted_banks": 0,
        "corrupted_checkpoints": 0,
        "corrupted_manifests": 0,
        "unexpected_exits": 0,
        "temp_files_left_by_kills": 0,
        "temp_files_after_episodes": 0,
        "check_problems": 0,
        "max_prompt_diff": 0.0,
        "wrong_steps": 0,
        "kills_by_moment": {},
        "problems": [],
    }
    while stats["kills"] < target:
        stats["episodes"] += 1
        root = Path(shutil.copytree(where / "fresh", where / f"{name}-episode-{stats['episodes']}"))
        first = True
        while True:
            how, detail = plan(rng)
            has_ckpt = runs.checkpoint_path(proj.load(root), "soak").exists()
            pid, reader, lines, started = child(run_tune, tune_args(where, root), detail if how == "write" else None)
            stats["launches"] += 1
            if (
                not first
            ):  # a relaunch after a kill: it resumes from the checkpoint, or starts over before the first one
                stats["resumes" if has_ckpt else "restarts"] += 1
            first = False
            if how == "timed":
                started.wait()
                time.sleep(detail * span)
                os.kill(pid, signal.SIGKILL)
            code = wait(pid)
            reader.join(5)
            if code == -signal.SIGKILL:
                stats["kills"] += 1
                key = "timed" if how == "timed" else f"{detail[0]}:{detail[1]}"
                stats["kills_by_moment"][key] = stats["kills_by_moment"].get(key, 0) + 1
                inspect(root, stats)
                continue
            if code != 0:
                stats["unexpected_exits"] += 1
                stats["problems"].append(f"exit {code}: {''.join(lines)[-800:]}")
            break
        if code == 0:
            prompt, meta = bank.get(proj.load(root), "soak")
            stats["max_prompt_diff"] = max(stats["max_prompt_diff"], float((prompt - reference).abs().max()))
            stats["wrong_steps"] += meta.steps != STEPS
        stats["temp_files_after_episodes"] += len(storage.temp_files(root))
        stats["check_problems"] += len(check(root).problems)
        shutil.rmtree(root)
        print(
            f"{name} episode {stats['episodes']}: kills {stats['kills']}, resumes {stats['resumes']}, "
            f"max diff {stats['max_prompt_diff']:.2e}",
            file=sys.stderr,
            flush=True,
        )
    return stats


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=110)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--workers", type=int, default=2, help="soak processes side by side (each kills its own launches)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    a = ap.parse_args()
    s = soak(a.kills, a.seed, a.out, a.workers)
    ok = s["kills"] >= 100 and s["corrupted_banks"] == 0 and s["max_prompt_diff"] <= 1e-6 and not s["unexpected_exits"]
    print(json.dumps({k: v for k, v in s.items() if k != "problems"}), flush=True)
    sys.exit(0 if ok else 1)
