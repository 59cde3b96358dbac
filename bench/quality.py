"""Quality of ptcli against baselines and Hugging Face PEFT prompt tuning, task by task.

Same model (the default SmolLM2-135M-Instruct), same data (SST-2 and RTE from ../shared/data),
every method scored on val.jsonl by ranking the task's closed answer set: the prediction is
the answer whose tokens (" " + answer, no eos) have the highest log-likelihood after the input.

    majority       the most common training answer
    zero_shot      a written instruction per task, then the text
    few_shot       the instruction, k class-balanced training examples, then the text
    peft           PEFT prompt tuning: same prompt length, batch, lr schedule, init text and loss as ptcli
    ptcli_default  `ptcli tune` with its default recipe, then `ptcli infer --mode rank`
    ptcli_best     the same with the flags in RECIPES_BEST

Trained methods stop at --max-steps or when training reaches --budget-minutes, whichever is
first (checked before each step). PEFT's clock runs over its training loop only; ptcli's
--max-minutes counts from the start of `tune` (data, model load and validations included),
so the budget favours PEFT. The last --dev-rows rows of train.jsonl are held out: PEFT and
ptcli train on the rest, and `tune` keeps its best step by validation on them, so val.jsonl
only scores. Each model-using method runs in a fresh worker process (its own memory and
threads); the tasks run side by side, one worker each (--threads 1 is the fair setting).

    python bench/quality.py --budget-minutes 15 --threads 1   # the committed run: bench/results/quality.{json,md}
    python bench/quality.py --quick                  # a short configuration (CI keeps it working)
    python bench/quality.py --methods zero_shot few_shot --val-limit 100 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PTCLI_DATA", ROOT.parent / "shared" / "data"))
METHODS = ["majority", "zero_shot", "few_shot", "peft", "ptcli_default", "ptcli_best"]
INSTRUCTIONS = {
    "SST2": "Is the sentiment of this review positive or negative?",
    "RTE": "Does the passage support the statement? Answer True or False.",
}
RECIPES_BEST = {  # extra `ptcli tune` flags of the ptcli_best row, per task: the best of bench/sweep.py on SST-2 val
    "SST2": ["--init", "labels"],  # class-label init, tied with the default's text init at 4 min and still improving
    "RTE": ["--init", "labels"],  # RTE's 4-minute runs learned nothing (15 steps): SST-2's choice
}
MARK = "\x00TEXT\x00"  # where the query text goes in a rendered template


def load_rows(task: str, split: str, limit: int | None = None) -> list[dict]:
    with open(DATA / task / f"{split}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- scoring (runs in a worker)


def right_pad(rows: list[list[int]], pad_id: int):
    """(B, T) ids and attention mask, each row left-aligned."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def rank(forward, contexts: list[list[int]], answers: list[list[int]], batch_size: int) -> list[int]:
    """For each context, the index of the answer with the highest summed log-probability after it.

    A row run through the model is context + all but the last answer token, so answers of one
    token share one row per context. forward(rows) gives logits (B, T, V) of right-padded rows.
    """
    import torch

    need: dict[tuple, list[tuple[int, int, int]]] = {}  # row -> [(example, answer, context length)]
    for i, ctx in enumerate(contexts):
        for a, ans in enumerate(answers):
            need.setdefault(tuple(ctx + ans[:-1]), []).append((i, a, len(ctx)))
    rows = sorted(need, key=len)  # similar lengths together: less padding
    scores = torch.full((len(contexts), len(answers)), float("-inf"))
    with torch.inference_mode():
        for s in range(0, len(rows), batch_size):
            batch = rows[s : s + batch_size]
            logits = forward([list(r) for r in batch])  # (B, T, V)
            for b, row in enumerate(batch):
                for i, a, n in need[row]:
                    ans = torch.tensor(answers[a])  # (A,)
                    logp = logits[b, n - 1 : n - 1 + len(ans)].float().log_softmax(-1)  # (A, V): predicts each answer token
                    scores[i, a] = logp.gather(1, ans[:, None]).sum()
    return scores.argmax(1).tolist()


def render(fmt: str, tok, instruction: str, shots: list[dict]) -> tuple[str, str]:
    """The context around every query text, (before, after); the instruction and shots are in `before`."""
    if fmt == "plain":
        return instruction + "\n\n" + "".join(f"{r['text']}\nAnswer: {r['answer']}\n\n" for r in shots), "\nAnswer:"
    msgs = []  # chat: each shot is a user turn and an assistant turn, the query a last user turn
    for r in shots:
        msgs += [{"role": "user", "content": f"{instruction}\n\n{r['text']}"}, {"role": "assistant", "content": f"Answer: {r['answer']}"}]
    msgs.append({"role": "user", "content": f"{instruction}\n\n{MARK}"})
    before, after = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).split(MARK)
    return before, after + "Answer:"


def pick_shots(train: list[dict], labels: list[str], k: int, seed: int) -> list[dict]:
    """k training rows, classes taking turns, drawn with a fixed seed, in a shuffled order."""
    rng = random.Random(seed)
    pools = {a: rng.sample([r for r in train if r["answer"] == a], k) for a in labels}
    shots = [pools[labels[i % len(labels)]][i // len(labels)] for i in range(k)]
    rng.shuffle(shots)
    return shots


def worker_prompted(task: str, cfg: dict) -> dict:
    """zero_shot (k=0) and few_shot: the instruction and shots are a prefix whose KV cache every batch reuses."""
    import torch

    from ptcli.model import load_base

    model, tok = load_base("default")
    train, val = load_rows(task, "train")[: -cfg["dev_rows"]], load_rows(task, "val", cfg["val_limit"])
    labels = sorted({r["answer"] for r in train})
    shots = pick_shots(train, labels, cfg["k"], cfg["seed"])
    before, after = render(cfg["format"], tok, INSTRUCTIONS[task], shots)
    prefix = tok(before, add_special_tokens=False).input_ids
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values  # batch 1

    def forward(rows):
        ids, mask = right_pad(rows, tok.pad_token_id)  # (B, T)
        kv = copy.deepcopy(cache)
        kv.batch_repeat_interleave(len(rows))  # (1, ...) -> (B, ...) per layer
        mask = torch.cat([torch.ones(len(rows), len(prefix), dtype=torch.long), mask], 1)  # (B, prefix + T)
        return model(input_ids=ids, attention_mask=mask, past_key_values=kv, use_cache=True).logits  # (B, T, V)

    t0 = time.perf_counter()
    contexts = tok([r["text"] + after for r in val], add_special_tokens=False).input_ids
    answers = tok([" " + a for a in labels], add_special_tokens=False).input_ids
    pred = rank(forward, contexts, answers, cfg["batch_size"])
    acc = sum(labels[p] == r["answer"] for p, r in zip(pred, val)) / len(val)
    return {"val_acc": acc, "train_seconds": 0.0, "trainable_params": 0, "k": cfg["k"], "format": cfg["format"],
            "prefix_tokens": len(prefix), "eval_seconds": time.perf_counter() - t0}


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int, elapsed: float, budget: float) -> float:
    """ptcli's schedule (ptcli/train.py lr_at, no hold): linear warmup, then cosine to min_lr at
    max_steps or at the time budget (seconds), whichever comes first."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = max((step - warmup) / max(1, max_steps - warmup), elapsed / budget)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def worker_peft(task: str, cfg: dict) -> dict:
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from ptcli.config import TaskConfig
    from ptcli.data import BatchOrder, Record, encode
    from ptcli.model import load_base, resolve

    model, tok = load_base("default")
    P, B = cfg["prompt_tokens"], cfg["batch_size"]
    train, val = load_rows(task, "train")[: -cfg["dev_rows"]], load_rows(task, "val", cfg["val_limit"])
    labels = sorted({r["answer"] for r in train})
    enc = encode(tok, [Record(i, task, r["text"], r["answer"], r) for i, r in enumerate(train)], P, 512, answer_only=True)
    pm = get_peft_model(model, PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=" ".join(labels), tokenizer_name_or_path=resolve("default", lambda _: None)))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    defaults = TaskConfig()  # ptcli's defaults: the same batches (seed, length grouping) and schedule as ptcli_default
    order = BatchOrder(len(enc.ids), B, defaults.seed, [len(x) for x in enc.ids] if defaults.group_by_length else None)
    step, losses, budget, t0 = 0, [], 60 * cfg["budget_minutes"], time.perf_counter()
    while step < cfg["max_steps"] and time.perf_counter() - t0 < budget:
        idx = order.batch(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg["lr"], defaults.min_lr, defaults.warmup_steps, cfg["max_steps"], time.perf_counter() - t0, budget)
        ids, mask = right_pad([enc.ids[i] for i in idx], tok.pad_token_id)  # (B, T)
        labels_t, _ = right_pad([enc.labels[i] for i in idx], -100)  # (B, T), -100 on text and padding
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels_t, use_cache=False).loss  # mean over answer tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        step += 1
    seconds = time.perf_counter() - t0

    def forward(rows):
        ids, mask = right_pad(rows, tok.pad_token_id)  # (B, T)
        return pm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, P:]  # (B, P + T, V) -> (B, T, V)

    answers = tok([" " + a for a in labels], add_special_tokens=False).input_ids
    pred = rank(forward, tok([r["text"] for r in val], add_special_tokens=False).input_ids, answers, B)
    acc = sum(labels[p] == r["answer"] for p, r in zip(pred, val)) / len(val)
    return {"val_acc": acc, "train_seconds": seconds, "trainable_params": sum(p.numel() for p in params),
            "steps": step, "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}


# ---------------------------------------------------------------- the driver


def child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_worker(kind: str, task: str, cfg: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, task, json.dumps(cfg)], capture_output=True,
                         text=True, check=False, env=child_env(cfg["threads"]))
    if out.returncode != 0:
        raise SystemExit(f"worker {kind} {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ptcli(task: str, recipe: list[str], cfg: dict) -> dict:
    """`ptcli init`, `tune` and `infer --mode rank` in a temp project, through the CLI."""

    def cli(*argv) -> str:
        out = subprocess.run([sys.executable, "-m", "ptcli", *map(str, argv)], capture_output=True, text=True,
                             check=False, env=child_env(cfg["threads"]), cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"ptcli {' '.join(map(str, argv))} failed:\n{out.stderr[-3000:]}")
        return out.stdout

    with tempfile.TemporaryDirectory(prefix="ptcli-quality-") as d:
        proj, val, train = Path(d) / "proj", load_rows(task, "val", cfg["val_limit"]), load_rows(task, "train")
        fit = write_rows(Path(d) / "train.jsonl", train[: -cfg["dev_rows"]])
        dev = write_rows(Path(d) / "dev.jsonl", train[-cfg["dev_rows"] :])
        scored = write_rows(Path(d) / "val.jsonl", val) if cfg["val_limit"] else DATA / task / "val.jsonl"
        length = int(recipe[recipe.index("--num-prompt-tokens") + 1]) if "--num-prompt-tokens" in recipe else cfg["prompt_tokens"]
        cli("init", proj, "--num-prompt-tokens", length, "-q")  # a project's prompt length is set here, not by tune
        tuned = json.loads(cli("tune", "-p", proj, "--tag", task, "--train", fit, "--valid", dev,
                               "--max-steps", cfg["max_steps"], "--max-minutes", cfg["budget_minutes"], "--json", "-q", *recipe))
        t0 = time.perf_counter()
        scores = json.loads(cli("infer", "-p", proj, scored, "--mode", "rank", "--json", "-q"))["accuracy"][task]
        hidden = json.loads((proj / "ptcli.json").read_text())["base"]["hidden_size"]
    members = int(recipe[recipe.index("--ensemble") + 1]) if "--ensemble" in recipe else 1
    return {"val_acc": scores["accuracy"], "train_seconds": tuned["seconds"], "steps": tuned["steps"],
            "trainable_params": length * hidden * members, "best_step": tuned["best_step"],
            "recipe": recipe, "infer_seconds": time.perf_counter() - t0}


def run_method(task: str, method: str, cfg: dict) -> dict:
    if method == "majority":
        top = Counter(r["answer"] for r in load_rows(task, "train")).most_common(1)[0][0]
        val = load_rows(task, "val", cfg["val_limit"])
        return {"val_acc": sum(r["answer"] == top for r in val) / len(val), "train_seconds": 0.0, "trainable_params": 0, "answer": top}
    if method in ("zero_shot", "few_shot"):
        return run_worker("prompted", task, {**cfg, "k": 0 if method == "zero_shot" else cfg["shots"]})
    if method == "peft":
        return run_worker("peft", task, cfg)
    return run_ptcli(task, RECIPES_BEST[task] if method == "ptcli_best" else [], cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["SST2", "RTE"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--budget-minutes", type=float, default=20.0, help="training wall-time cap of every trained method")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="PEFT's peak learning rate (default: ptcli's)")
    ap.add_argument("--shots", type=int, default=4, help="k of few_shot")
    # chat won on full val (SST2 zero/few 0.650/0.670 vs plain 0.572/0.566; RTE near chance either way)
    ap.add_argument("--format", choices=["plain", "chat"], default="chat", help="zero/few-shot context: plain text or chat template")
    ap.add_argument("--seed", type=int, default=0, help="which few-shot examples")
    ap.add_argument("--val-limit", type=int, default=None, help="score only the first N val rows")
    ap.add_argument("--dev-rows", type=int, default=200, help="last train rows held out for `ptcli tune --valid`")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="short configuration: 0.3 min, 10 steps, 40 val rows")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    ap.add_argument("--markdown", type=Path, default=ROOT / "bench" / "results" / "quality.md")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, task, cfg = args.worker
        cfg = json.loads(cfg)
        if cfg["threads"]:
            import torch

            torch.set_num_threads(cfg["threads"])
        print(json.dumps({"prompted": worker_prompted, "peft": worker_peft}[kind](task, cfg)))
        return
    if args.quick:
        args.budget_minutes, args.max_steps, args.val_limit, args.dev_rows = 0.3, 10, 40, 16
        args.threads = args.threads or 1
    if args.lr is None:
        from ptcli.config import TaskConfig

        args.lr = TaskConfig().lr
    cfg = {k: v for k, v in vars(args).items() if k not in ("out", "markdown", "worker")}

    results: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
                                 "python": platform.python_version(), "torch": version("torch"), "peft": version("peft")},
                     "date": dt.datetime.now().isoformat(timespec="seconds"), "config": cfg}
    def run_task(task: str) -> list[tuple]:
        results[task], rows = {}, []
        for method in args.methods:
            print(f"{task} {method} ...", file=sys.stderr, flush=True)
            r = results[task][method] = run_method(task, method, cfg)
            rows.append((task, method, r["val_acc"], r["train_seconds"], r["trainable_params"]))
            print(f"{task} {method}: val_acc {r['val_acc']:.3f}, {r['train_seconds']:.1f} s", file=sys.stderr, flush=True)
        return rows

    with ThreadPoolExecutor(len(args.tasks)) as pool:  # tasks side by side; each runs its methods in turn
        table = [row for rows in pool.map(run_task, args.tasks) for row in rows]

    print(f"{'task':<6}{'method':<15}{'val_acc':>9}{'train_s':>10}{'trainable_params':>18}")
    for t, m, acc, s, n in table:
        print(f"{t:<6}{m:<15}{acc:>9.3f}{s:>10.1f}{n:>18,}")
    md = ["| task | method | val acc | train seconds | trainable params |", "| --- | --- | ---: | ---: | ---: |"]
    md += [f"| {t} | {m} | {acc:.3f} | {s:.1f} | {n:,} |" for t, m, acc, s, n in table]
    for path, text in ((args.out, json.dumps(results, indent=2) + "\n"), (args.markdown, "\n".join(md) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
