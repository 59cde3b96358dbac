"""Speed and memory of ptcli against Hugging Face PEFT prompt tuning, side by side.

Same model (the default SmolLM2-135M-Instruct), same data (SST-2 and RTE from ../shared/data),
same batches, prompt lengths and optimizer (AdamW). Each measurement runs in a fresh worker
process (so peak RSS is its own), and ptcli and PEFT workers alternate, so machine load
hits both alike. Reports medians.

    python bench/speed.py                 # full run, writes bench/results/speed.json
    python bench/speed.py --quick         # a short configuration (CI keeps it working)
    python bench/speed.py --sections infer serve   # only these rows, merged into speed.json's others

Section serve: `ptcli serve` with `--engine torch`, `--engine llama.cpp` and `--engine llama.cpp
--llama-weights bf16` (bench/serve.py's batching server and closed-loop clients, three tags mixed),
1, 8 and 32 clients each, and each server's peak RSS. PEFT has no server: it has no serve row.

Throughput counts the tokens each example really has (soft prompt + text + answer, no
padding), the same way for both tools. Hardware use counts the work each tool actually does:
4 * (non-embedding parameters) * (positions run through the decoder, padding included),
i.e. forward plus the backward pass through activations (no weight gradients in prompt
tuning); ptcli runs the soft prompt once per batch, PEFT once per row. The vocabulary
projection is left out of the count for both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datadir
import serve as serve_bench  # bench/serve.py: its project, server and clients

ROOT = Path(__file__).resolve().parent.parent
DATA = datadir.DEFAULT  # --data-dir; workers get it on their command line
DEVICE = os.environ.get("PTCLI_BENCH_DEVICE", "cpu")  # training workers only; scripts/gpu_check.sh sets cuda


def load_rows(task: str, split: str, n: int) -> list[dict]:
    rows = []
    with open(DATA / task / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- workers (run in a child process)


def worker_train(tool: str, prompt_len: int, steps: int, batch: int, task: str = "SST2") -> dict:
    """tool: ptcli (the prompt first), ptcli-suffix (--template suffix: the text runs without gradient),
    ptcli-lateK (suffix, --prompt-layer K, the states below K and the texts kept: steady-state steps; the first
    pass's steps apart), ptcli-lateK-deep-choices (the same with --deep --loss choices) or peft."""
    import torch

    from ptcli.data.encode import encode
    from ptcli.data.jsonl import Record
    from ptcli.lm.base import load_base
    from ptcli.lm.forward import lm_loss
    from ptcli.tuning.soft_prompt import SoftPrompt, init_prompt

    model, tok = load_base("default")
    model.to(DEVICE)
    rows = load_rows(task, "train", steps * batch + batch)
    records = [Record(i, r["prompt_tag"], r["text"], r["answer"], r) for i, r in enumerate(rows)]
    template = "suffix" if tool in ("ptcli-suffix",) or tool.startswith("ptcli-late") else "prefix"
    enc = encode(tok, records, prompt_len, 512, answer_only=True, template=template)
    size = [len(ids) + (prompt_len if template == "prefix" else 0) for ids in enc.ids]  # real positions of each row
    batches = [list(range(s * batch, (s + 1) * batch)) for s in range(steps + 1)]
    init = init_prompt(model, tok, prompt_len, "text", " ".join(sorted({r["answer"] for r in rows})), 0).to(DEVICE)
    times, tokens, positions = [], [], []
    blocks = model.config.num_hidden_layers
    late = int(tool.removeprefix("ptcli-late").split("-")[0]) if tool.startswith("ptcli-late") else 0
    cold: list[float] = []
    if late:
        from ptcli.data.encode import answer_tokens
        from ptcli.lm.depth import entering
        from ptcli.lm.frozen import lifted
        from ptcli.tuning.loss import StepRows, batch_loss, candidate_rows
        from ptcli.tuning.states import FrozenStates

        deep = tool.endswith("-deep-choices")  # --deep --loss choices: each row once per candidate, vectors per block
        depth = blocks - late if deep else 1
        loss = "choices" if deep else "answer"
        choices = sorted({r["answer"] for r in rows})
        candidates = answer_tokens(tok, choices)
        prompt = SoftPrompt(lifted(model, late, init, depth))
        opt = torch.optim.AdamW(prompt.parameters(), lr=3e-2, weight_decay=0.0)
        states = FrozenStates(model, late, 1 << 36)

        def rows_of(idx):
            if not deep:
                ids, labels = [enc.ids[i] for i in idx], [enc.labels[i] for i in idx]
                return StepRows(ids, labels, [0] * len(idx), [(i,) for i in idx], list(range(len(idx))), [])
            out = StepRows([], [], [], [], [], [choices.index(records[i].answer) for i in idx])
            for b, i in enumerate(idx):
                for seq, labels, key in candidate_rows(enc.prompts[i], candidates, (i,)):
                    out.seqs.append(seq)
                    out.labels.append(labels)
                    out.keys.append(key)
                    out.which.append(0)
                    out.example.append(b)
            return out

        def step(idx):
            with entering(model, late, depth):
                loss_sum, n = batch_loss(model, prompt(), rows_of(idx), loss, tok.pad_token_id, states, late, depth)
            (loss_sum / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for idx in batches:  # the first pass: each row's states below the prompt, and its text, are computed and kept
            t0 = time.perf_counter()
            step(idx)
            cold.append(time.perf_counter() - t0)
        cold = cold[1:]  # the first step warms up allocators and kernels
    elif tool.startswith("ptcli"):
        prompt = SoftPrompt(init)
        opt = torch.optim.AdamW(prompt.parameters(), lr=3e-2, weight_decay=0.0)

        def step(idx):
            loss_sum, n = lm_loss(
                model, prompt(), [enc.ids[i] for i in idx], [enc.labels[i] for i in idx], tok.pad_token_id
            )
            (loss_sum / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from peft import PromptTuningConfig, TaskType, get_peft_model

        pm = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt_len))
        with torch.no_grad():
            pm.prompt_encoder["default"].embedding.weight.copy_(init)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)

        def step(idx):
            T = max(len(enc.ids[i]) for i in idx)
            ids = torch.full((len(idx), T), tok.pad_token_id)
            mask = torch.zeros(len(idx), T, dtype=torch.long)
            labels = torch.full((len(idx), T), -100)
            for r, i in enumerate(idx):  # right padding, as PEFT's examples do
                n = len(enc.ids[i])
                ids[r, :n] = torch.tensor(enc.ids[i])
                mask[r, :n] = 1
                labels[r, :n] = torch.tensor(enc.labels[i])
            out = pm(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for s, idx in enumerate(batches):
        t0 = time.perf_counter()
        step(idx)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
        if s > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
            tokens.append(sum(size[i] for i in idx))
            T = max(len(enc.ids[i]) for i in idx)  # padded row length (prompt slots included for the suffix)
            positions.append(
                len(idx) * T + prompt_len
                if tool == "ptcli"
                else len(idx) * max(len(enc.ids[i]) - enc.ids[i].index(-1) for i in idx) * (blocks - late) / blocks
                if late  # the text is kept: only the prompt and the answer run, through the blocks above the prompt
                else len(idx) * (T + prompt_len * (tool == "peft"))
            )
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    return {
        "step_s": times,
        "cold_step_s": cold,  # late prompts: the first pass's steps, whose rows run below the prompt for the first time
        "tokens": tokens,
        "positions": positions,
        "peak_rss_mb": peak_rss_mb(),
        "n_params_non_embedding": n_params,
    }


INFER_TOOLS = ("ptcli", "ptcli-llama.cpp", "ptcli-llama.cpp-bf16", "peft")  # torch, llama.cpp on the GGUF, PEFT
INFER_NAMES = {
    "ptcli": "ptcli, torch",
    "ptcli-llama.cpp": "ptcli, llama.cpp (the GGUF file)",
    "ptcli-llama.cpp-bf16": "ptcli, llama.cpp (`--llama-weights bf16`)",
    "peft": "PEFT",
}


def text_prompt(source: Path, tok, text: str, P: int):
    """(P, H) numpy: the embedding rows of `text`'s tokens, tiled to P, read from the converted base's safetensors
    (every tool gets the same prompts, and a llama.cpp worker imports no torch for them, as `ptcli infer` does not)."""
    import numpy as np
    from safetensors import safe_open

    ids = tok(text, add_special_tokens=False).input_ids
    with safe_open(str(source / "model.safetensors"), "np") as f:
        table = f.get_slice("model.embed_tokens.weight")
        return np.concatenate([table[i : i + 1] for i in (ids * P)[:P]])


def infer_engine(tool: str, tok, source: Path):
    """ptcli's engine for `tool`: the torch path, or llama.cpp on the GGUF file (or its bf16 re-encoding)."""
    from ptcli.enums import LlamaWeights
    from ptcli.inference.engine import Engine
    from ptcli.lm.source import default_gguf

    if tool == "ptcli":
        from ptcli.lm.base import load_base

        return Engine(*load_base("default"))
    from ptcli.inference.llama_context import weights_of
    from ptcli.inference.llamacpp import LlamaCppEngine

    kind = LlamaWeights.BF16 if tool.endswith("-bf16") else LlamaWeights.FILE
    return LlamaCppEngine(tok, weights_of(default_gguf(), source, kind, lambda m: print(m, file=sys.stderr)))


def worker_infer(tool: str, prompt_len: int, n_per_tag: int, batch: int, new_tokens: int) -> dict:
    """Greedy answers of mixed SST2 and RTE rows. Every tool batches the same way: each tag's rows sorted by
    length, in batches of `batch` (ptcli's plan mixes tags in a batch, PEFT runs one adapter at a time). A llama.cpp
    worker imports what `ptcli infer --engine llama.cpp` does: no torch, no transformers (its peak RSS is that)."""
    from ptcli.enums import Mode
    from ptcli.inference.engine import Item, Prompt
    from ptcli.inference.infer import plan
    from ptcli.inference.tokenizer import load_tokenizer
    from ptcli.lm.source import DEFAULT_REF, resolve
    from ptcli.project.record import PromptRecord

    source = Path(resolve(DEFAULT_REF, lambda _: None))
    tok = load_tokenizer(source)  # transformers' ids (tests/test_tokenizer.py)
    tags = {"SST2": "positive negative", "RTE": "True False"}
    rows = [r for task in tags for r in load_rows(task, "val", n_per_tag)]
    rows = [rows[i] for i in sorted(range(len(rows)), key=lambda i: (i * 7919) % len(rows))]  # mixed order
    prompts = {t: text_prompt(source, tok, txt, prompt_len) for t, txt in tags.items()}
    texts = tok([r["text"] for r in rows], add_special_tokens=False).input_ids
    if tool.startswith("ptcli"):  # `ptcli infer`'s path: both tags in length-sorted mixed batches, through the engine
        engine, record = infer_engine(tool, tok, source), PromptRecord(config={"max_seq_length": 512})
        if tool == "ptcli":
            import torch

            prompts = {t: torch.from_numpy(p) for t, p in prompts.items()}
        loaded = {t: Prompt(t, p[None], record) for t, p in prompts.items()}
        items = [Item(loaded[r["prompt_tag"]], r["text"], Mode.GENERATE, new_tokens) for r in rows]
        seqs = engine.rows(items, texts)
        t0 = time.perf_counter()
        for idx in plan(engine, items, seqs, batch):
            engine.run([items[i] for i in idx], [seqs[i] for i in idx])
    else:
        import torch
        from peft import PromptTuningConfig, TaskType, get_peft_model

        from ptcli.lm.base import load_base

        model, tok = load_base("default")
        pm = get_peft_model(
            model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt_len), adapter_name="SST2"
        )
        pm.add_adapter("RTE", PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt_len))
        for tag in tags:
            with torch.no_grad():
                pm.prompt_encoder[tag].embedding.weight.copy_(torch.from_numpy(prompts[tag]))
        tok.padding_side = "left"
        t0 = time.perf_counter()
        with torch.inference_mode():
            for tag in tags:  # PEFT: one adapter at a time, the tag's rows sorted by length as ptcli's plan sorts
                pm.set_adapter(tag)
                idx = sorted((i for i, r in enumerate(rows) if r["prompt_tag"] == tag), key=lambda i: len(texts[i]))
                for s in range(0, len(idx), batch):
                    enc = tok(
                        [rows[i]["text"] for i in idx[s : s + batch]],
                        return_tensors="pt",
                        padding=True,
                        add_special_tokens=False,
                    )
                    pm.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "examples": len(rows), "peak_rss_mb": peak_rss_mb()}


def worker_matmul() -> dict:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    return {"flops": 2 * 2048**3 * reps / (time.perf_counter() - t0)}


# ---------------------------------------------------------------- the driver


def run_worker(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--data-dir", str(DATA), "--worker", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def list_tags_seconds(n_tags: int = 50) -> float:
    """Wall time of `ptcli list-tags` on a bank of n prompts (a fake base: only headers are read)."""
    import torch

    from ptcli.project import bank
    from ptcli.project import manifest as project
    from ptcli.project.record import PromptRecord

    with tempfile.TemporaryDirectory() as d:
        p = project.create(Path(d) / "p", project.BaseInfo("default", "0" * 64, 576, "llama"), 20)
        for i in range(n_tags):
            bank.put(
                p,
                f"task{i:02d}",
                torch.randn(20, 576),
                PromptRecord(steps=100, metrics={"val_acc": 0.5, "val_loss": 1.0}, init="text"),
            )
        ptcli = str(Path(sys.executable).parent / "ptcli")
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run([ptcli, "list-tags", "-p", str(p.root)], capture_output=True, check=True)
            walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short configuration (few steps, prompt length 20 only)")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions per measurement")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per worker")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speed.json")
    ap.add_argument(
        "--sections",
        nargs="+",
        default=["all"],
        choices=["all", "late", "infer", "serve"],
        help="late, infer, serve: only the late-prompt, inference or serving rows, merged into --out's other results "
        "(each section's machine and date go under 'sections')",
    )
    ap.add_argument("--infer-table", action="store_true", help="print --out's inference rows as docs show them")
    ap.add_argument("--serve-table", action="store_true", help="print --out's serving rows as docs show them")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    datadir.add_flag(ap)
    args = ap.parse_args()
    if args.infer_table:
        return print(infer_table(json.loads(args.out.read_text())), end="")
    if args.serve_table:
        return print(serve_bench.engines_table(json.loads(args.out.read_text())["serve_engines"]["runs"]), end="")
    global DATA
    needs = (
        [] if args.worker else ["SST2/train.jsonl", "SST2/val.jsonl", "RTE/train.jsonl", "RTE/val.jsonl"]
    )  # a worker reads what it is given
    DATA = datadir.check(args.data_dir, needs)
    if args.worker:
        kind, *rest = args.worker
        fn = {"train": worker_train, "infer": worker_infer, "matmul": worker_matmul}[kind]
        typed = [int(x) if x.isdigit() else x for x in rest]
        print(json.dumps(fn(*typed)))
        return

    lengths = [20] if args.quick else [20, 100]
    reps, steps = (1, 2) if args.quick else (args.reps, args.steps)
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": dt.date.today().isoformat(),
        "batch": args.batch,
        "steps_per_worker": steps,
    }
    peak = statistics.median(run_worker("matmul")["flops"] for _ in range(3))
    results["matmul_gflops"] = peak / 1e9
    rows = []

    def train(label: str, key: str, tools: tuple[str, ...], P: int, task: str) -> dict[str, float]:
        """Alternate the tools' workers `reps` times; record each tool's medians; return its tokens/s."""
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        for _ in range(reps):
            for tool in tools:
                runs[tool].append(run_worker("train", tool, str(P), str(steps), str(args.batch), task))
        tps = {}
        for tool, rs in runs.items():
            cold = [s for r in rs for s in r["cold_step_s"]]
            step_s = statistics.median(s for r in rs for s in r["step_s"])
            tok_per_s = statistics.median(t / s for r in rs for t, s in zip(r["tokens"], r["step_s"]))
            rss = max(r["peak_rss_mb"] for r in rs)
            pos_per_s = statistics.median(p / s for r in rs for p, s in zip(r["positions"], r["step_s"]))
            flops = 4 * rs[0]["n_params_non_embedding"] * pos_per_s
            tps[tool] = tok_per_s
            results[f"{key}_{tool}"] = {
                "tokens_per_s": tok_per_s,
                "step_s": step_s,
                **({"first_pass_step_s": statistics.median(cold)} if cold else {}),
                "peak_rss_mb": rss,
                "flops_fraction": flops / peak,
            }
            rows.append(
                (
                    label,
                    tool,
                    f"{tok_per_s:,.0f} tok/s",
                    f"{step_s:.2f} s/step",
                    f"{rss:,.0f} MB",
                    f"{flops / peak:.1%} of peak",
                )
            )
        return tps

    if "all" not in args.sections:
        here = {k: results[k] for k in ("machine", "date", "batch", "matmul_gflops")}
        results = json.loads(args.out.read_text()) if args.out.exists() else results
        results["sections"] = results.get("sections", {}) | {s: here for s in args.sections}
        if "late" in args.sections:
            late_rows(train, results)
        if "infer" in args.sections:
            infer_rows(args.quick, reps, args.batch, results, rows)
        if "serve" in args.sections:
            serve_rows(args.quick, results)
        rows_done(rows, results, args.out, peak / 1e9)
        return
    late_rows(train, results)
    for P in lengths:
        tps = train(f"train P={P}", f"train_p{P}", ("ptcli", "peft"), P, "SST2")
        results[f"train_ratio_p{P}"] = tps["ptcli"] / tps["peft"]
    for task in ("SST2", "RTE"):  # where the prompt sits: the suffix runs the text before it without gradient
        tps = train(f"{task} P=20", f"layout_{task}", ("ptcli", "ptcli-suffix", "peft"), 20, task)
        results[f"suffix_vs_prefix_ratio_{task}"] = tps["ptcli-suffix"] / tps["ptcli"]
        results[f"suffix_vs_peft_ratio_{task}"] = tps["ptcli-suffix"] / tps["peft"]
    infer_rows(args.quick, reps, args.batch, results, rows)
    serve_rows(args.quick, results)
    P0 = lengths[-1]
    results["train_peak_fraction"] = results[f"train_p{P0}_ptcli"]["flops_fraction"]
    results["rss_ratio"] = results[f"train_p{P0}_ptcli"]["peak_rss_mb"] / results[f"train_p{P0}_peft"]["peak_rss_mb"]
    results["list_tags_seconds"] = list_tags_seconds()
    rows_done(rows, results, args.out, peak / 1e9)


def infer_rows(quick: bool, reps: int, batch: int, results: dict, rows: list) -> None:
    """Mixed-tag greedy inference, every tool of INFER_TOOLS alternating `reps` times: examples/s and peak RSS."""
    import importlib.util

    P, n_per_tag = (20, 16) if quick else (100, 48)
    tools = [t for t in INFER_TOOLS if "llama.cpp" not in t or importlib.util.find_spec("llama_cpp")]
    if len(tools) < len(INFER_TOOLS):
        print("llama-cpp-python is not installed (pip install 'ptcli[llamacpp]'): no llama.cpp rows", file=sys.stderr)
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    for _ in range(reps):
        for tool in tools:
            runs[tool].append(run_worker("infer", tool, str(P), str(n_per_tag), str(batch), "3"))
    speed = {}
    for tool, rs in runs.items():
        speed[tool] = statistics.median(r["examples"] / r["seconds"] for r in rs)
        rss = max(r["peak_rss_mb"] for r in rs)
        results[f"infer_p{P}_{tool}_examples_per_s"] = speed[tool]
        results[f"infer_p{P}_{tool}_peak_rss_mb"] = rss
        rows.append((f"infer P={P} mixed", tool, f"{speed[tool]:.1f} ex/s", "", f"{rss:,.0f} MB", ""))
    results[f"infer_ratio_p{P}"] = speed["ptcli"] / speed["peft"]
    for tool in [t for t in tools if "llama.cpp" in t]:
        name = tool.removeprefix("ptcli-").replace(".", "").replace("-", "_")
        results[f"infer_{name}_vs_torch_ratio_p{P}"] = speed[tool] / speed["ptcli"]
        results[f"infer_{name}_vs_torch_rss_ratio_p{P}"] = (
            results[f"infer_p{P}_{tool}_peak_rss_mb"] / results[f"infer_p{P}_ptcli_peak_rss_mb"]
        )


def infer_table(results: dict) -> str:
    """The mixed-tag inference rows of `results` as docs/benchmarks.md shows them."""
    P = 100 if "infer_p100_ptcli_examples_per_s" in results else 20
    torch_speed, torch_rss = results[f"infer_p{P}_ptcli_examples_per_s"], results[f"infer_p{P}_ptcli_peak_rss_mb"]
    lines = [
        f"| P={P}, greedy, 3 tokens | examples/s | peak RSS | speed against the torch path | RSS against it |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for tool in [t for t in INFER_TOOLS if f"infer_p{P}_{t}_examples_per_s" in results]:
        speed, rss = results[f"infer_p{P}_{tool}_examples_per_s"], results[f"infer_p{P}_{tool}_peak_rss_mb"]
        ratios = f"{speed / torch_speed:.2f}x | {rss / torch_rss:.2f}x"
        lines.append(f"| {INFER_NAMES[tool]} | {speed:.1f} | {rss:,.0f} MB | {ratios} |")
    return "\n".join(lines) + "\n"


def serve_rows(quick: bool, results: dict) -> None:
    """A batching `ptcli serve` per engine (torch, llama.cpp on the GGUF file and its bf16 re-encoding): req/s,
    latency and the server's peak RSS at 1, 8 and 32 clients, three tags in turn."""
    import importlib.util

    if not importlib.util.find_spec("llama_cpp"):
        print("llama-cpp-python is not installed (pip install 'ptcli[llamacpp]'): no serve rows", file=sys.stderr)
        return
    seconds, max_tokens = (2.0, 4) if quick else (20.0, 16)
    test = [json.loads(line) for line in (serve_bench.EXAMPLES / "test.jsonl").read_text().splitlines()]
    tags = list(serve_bench.TAGS)
    texts = [(tags[i % len(tags)], r["text"]) for i, r in enumerate(test)]  # mixed tags, in turn
    with tempfile.TemporaryDirectory() as tmp:
        root = serve_bench.make_project(Path(tmp), None)
        runs = serve_bench.engines(root, texts, seconds, max_tokens)
    results["serve_engines"] = {
        "tags": tags,
        "max_tokens": max_tokens,
        "seconds_per_measurement": seconds,
        "settings": serve_bench.SETTINGS["on"],
        "runs": runs,
    }


def late_rows(train, results: dict) -> None:
    """RTE steps with the prompt entering before block 15 or 20 (states below it kept) against the suffix layout."""
    tools = ("ptcli-suffix", "ptcli-late15", "ptcli-late20", "ptcli-late15-deep-choices")
    train("RTE P=20 late", "late_RTE", tools, 20, "RTE")
    for tool in tools:
        results[f"late_RTE_{tool}"]["steps_per_min"] = 60 / results[f"late_RTE_{tool}"]["step_s"]
    for K in (15, 20):
        results[f"late{K}_vs_suffix_ratio_RTE"] = (
            results[f"late_RTE_ptcli-late{K}"]["tokens_per_s"] / results["late_RTE_ptcli-suffix"]["tokens_per_s"]
        )


def rows_done(rows: list, results: dict, out: Path, gflops: float) -> None:
    print(f"{'measurement':<20}{'tool':<14}{'throughput':>16}{'step':>13}{'peak RSS':>11}{'FLOP/s':>16}")
    for r in rows:
        print(f"{r[0]:<20}{r[1]:<14}{r[2]:>16}{r[3]:>13}{r[4]:>11}{r[5]:>16}")
    print(
        f"\nmatmul peak {gflops:.1f} GFLOP/s; "
        f"list-tags on 50 prompts {results.get('list_tags_seconds', float('nan')):.3f} s"
    )
    for key in [k for k in results if "ratio" in k or k == "train_peak_fraction"]:
        print(f"{key}: {results[key]:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
