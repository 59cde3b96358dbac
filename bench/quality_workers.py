"""The model-using methods of bench/quality.py, each run in a fresh process by it.

    python bench/quality_workers.py KIND TASK CONFIG_JSON    # KIND: prompted, peft, peft_ptuning

Prints one JSON line: the method's row (accuracies on every scored split, train seconds, trainable
parameters, steps). Every method ranks the task's closed answer set: the prediction is the answer
whose tokens (" " + answer, no eos) have the highest log-likelihood after the input, optionally
after contextual calibration (ptcli.lm.answers.calibrate, as `ptcli infer --calibrate`).
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from pathlib import Path

MARK = "\x00TEXT\x00"  # where the query text goes in a rendered template
INSTRUCTIONS = {
    "SST2": "Is the sentiment of this review positive or negative?",
    "RTE": "Does the passage support the statement? Answer True or False.",
}


def load_rows(data_dir: str | Path, task: str, split: str, limit: int | None = None) -> list[dict]:
    with open(Path(data_dir) / task / f"{split}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def right_pad(rows: list[list[int]], pad_id: int):
    """(B, T) ids and attention mask, each row left-aligned."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def rank(forward, contexts: list[list[int]], answers: list[list[int]], batch_size: int):
    """(N, C) summed log-probability of each answer after each context.

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
                    logp = (
                        logits[b, n - 1 : n - 1 + len(ans)].float().log_softmax(-1)
                    )  # (A, V): predicts each answer token
                    scores[i, a] = logp.gather(1, ans[:, None]).sum()
    return scores


def score_splits(task: str, cfg: dict, labels: list[str], score) -> dict:
    """Accuracy on every scored split (cfg["scored"]: row key -> split), calibrated too when asked.

    score(texts) gives the (N, C) answer log-likelihoods of raw texts.
    """
    from ptcli.lm.answers import calibrate
    from ptcli.lm.rules import CONTENT_FREE

    free = score(list(CONTENT_FREE)) if cfg["calibrate"] else None  # (N_cf, C)
    out = {}
    for key, split in cfg["scored"].items():
        rows = load_rows(cfg["data_dir"], task, split, cfg["val_limit"])
        scores = score([r["text"] for r in rows])  # (N, C)
        versions = {key: scores} if free is None else {key: scores, f"{key}_calibrated": calibrate(scores, free)}
        for name, s in versions.items():
            out[name] = sum(labels[p] == r["answer"] for p, r in zip(s.argmax(1).tolist(), rows)) / len(rows)
    return out


def render(fmt: str, tok, instruction: str, shots: list[dict]) -> tuple[str, str]:
    """The context around every query text, (before, after); the instruction and shots are in `before`."""
    if fmt == "plain":
        return instruction + "\n\n" + "".join(f"{r['text']}\nAnswer: {r['answer']}\n\n" for r in shots), "\nAnswer:"
    msgs = []  # chat: each shot is a user turn and an assistant turn, the query a last user turn
    for r in shots:
        msgs += [
            {"role": "user", "content": f"{instruction}\n\n{r['text']}"},
            {"role": "assistant", "content": f"Answer: {r['answer']}"},
        ]
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

    from ptcli.lm.base import load_base

    model, tok = load_base("default")
    train = load_rows(cfg["data_dir"], task, "train")[: -cfg["dev_rows"]]
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
    answers = tok([" " + a for a in labels], add_special_tokens=False).input_ids
    acc = score_splits(
        task,
        cfg,
        labels,
        lambda texts: rank(
            forward, tok([t + after for t in texts], add_special_tokens=False).input_ids, answers, cfg["batch_size"]
        ),
    )
    return {
        **acc,
        "train_seconds": 0.0,
        "trainable_params": 0,
        "steps": 0,
        "k": cfg["k"],
        "format": cfg["format"],
        "prefix_tokens": len(prefix),
        "eval_seconds": time.perf_counter() - t0,
    }


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int, elapsed: float, budget: float) -> float:
    """ptcli's schedule (ptcli/tuning/recipe.py lr_at, no hold): linear warmup, then cosine to min_lr at
    max_steps or at the time budget (seconds), whichever comes first."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = max((step - warmup) / max(1, max_steps - warmup), elapsed / budget)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


PREPENDED = ("peft", "peft_ptuning")  # PEFT kinds whose virtual tokens stand in front of the logits
VAL_EVERY = 50  # steps between the dev scorings that pick a peer's best step: ptcli's --val-check-interval


def peft_config(kind: str, P: int, labels: list[str], hidden: int):
    """peft: prompt tuning from the class labels' text (as ptcli's default init); peft_ptuning:
    P-tuning, PEFT's MLP prompt encoder (hidden width = the model's) over randomly initialised prompt embeddings;
    peft_prefix: prefix tuning (per-layer key/value prefixes, PEFT's reparameterization off); peft_lora: LoRA of
    rank 8 on the attention projections (what a user would pick instead of prompt tuning)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, TaskType

    from ptcli.lm.source import resolve

    if kind == "peft_ptuning":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=P,
            encoder_reparameterization_type="MLP",
            encoder_hidden_size=hidden,
        )
    if kind == "peft_prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P)
    if kind == "peft_lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=P,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=" ".join(labels),
        tokenizer_name_or_path=resolve("default", lambda _: None),
    )


def worker_peft(task: str, cfg: dict, kind: str = "peft") -> dict:
    """A PEFT peer: ptcli_default's rows, batches, answer-only loss and schedule; its own lr (cfg["lrs"][kind]).

    Like ptcli, it keeps its best step: every VAL_EVERY steps and at the end the dev rows (the last
    --dev-rows of train.jsonl, ptcli's --valid) are ranked, and the val files score the best step's weights.
    """
    import torch
    from peft import get_peft_model

    from ptcli.config import TaskConfig
    from ptcli.data.encode import encode
    from ptcli.data.jsonl import Record
    from ptcli.lm.base import load_base
    from ptcli.tuning.batches import BatchOrder

    model, tok = load_base("default")
    P, B = cfg["prompt_tokens"], cfg["batch_size"]
    rows = load_rows(cfg["data_dir"], task, "train")
    train, dev = rows[: -cfg["dev_rows"]], rows[-cfg["dev_rows"] :]
    labels = sorted({r["answer"] for r in train})
    enc = encode(
        tok, [Record(i, task, r["text"], r["answer"], r) for i, r in enumerate(train)], P, 512, answer_only=True
    )
    pm = get_peft_model(model, peft_config(kind, P, labels, model.config.hidden_size))
    params = [p for p in pm.parameters() if p.requires_grad]
    lr = cfg.get("lrs", {}).get(kind) or cfg["lr"]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    defaults = TaskConfig()  # ptcli's defaults: the same batches (seed, length grouping) and schedule as ptcli_default
    order = BatchOrder(len(enc.ids), B, defaults.seed, [len(x) for x in enc.ids] if defaults.group_by_length else None)
    answers = tok([" " + a for a in labels], add_special_tokens=False).input_ids

    def forward(rows):
        ids, mask = right_pad(rows, tok.pad_token_id)  # (B, T)
        logits = pm(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, [P +] T, V)
        return logits[:, P:] if kind in PREPENDED else logits  # (B, T, V)

    def dev_acc() -> float:
        pm.eval()
        scores = rank(forward, tok([r["text"] for r in dev], add_special_tokens=False).input_ids, answers, B)
        pm.train()
        return sum(labels[p] == r["answer"] for p, r in zip(scores.argmax(1).tolist(), dev)) / len(dev)

    step, losses, budget, t0 = 0, [], 60 * cfg["budget_minutes"], time.perf_counter()
    best = (dev_acc(), 0, [p.detach().clone() for p in params])
    curve = [(0, best[0])]
    while step < cfg["max_steps"] and time.perf_counter() - t0 < budget:
        idx = order.batch(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(
                step,
                lr,
                defaults.min_lr * lr / defaults.lr,
                defaults.warmup_steps,
                cfg["max_steps"],
                time.perf_counter() - t0,
                budget,
            )
        ids, mask = right_pad([enc.ids[i] for i in idx], tok.pad_token_id)  # (B, T)
        labels_t, _ = right_pad([enc.labels[i] for i in idx], -100)  # (B, T), -100 on text and padding
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels_t, use_cache=False).loss  # mean over answer tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        step += 1
        if step % VAL_EVERY == 0:
            curve.append((step, dev_acc()))
            if curve[-1][1] > best[0]:
                best = (curve[-1][1], step, [p.detach().clone() for p in params])
    if curve[-1][0] != step:
        curve.append((step, dev_acc()))
        if curve[-1][1] > best[0]:
            best = (curve[-1][1], step, [p.detach().clone() for p in params])
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        for p, kept in zip(params, best[2]):
            p.copy_(kept)
    acc = score_splits(
        task, cfg, labels, lambda texts: rank(forward, tok(texts, add_special_tokens=False).input_ids, answers, B)
    )
    return {
        **acc,
        "train_seconds": seconds,
        "trainable_params": sum(p.numel() for p in params),
        "steps": step,
        "best_step": best[1],
        "dev_curve": curve,
        "lr": lr,
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
    }


def main() -> None:
    kind, task, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if cfg["threads"]:
        import torch

        torch.set_num_threads(cfg["threads"])
    row = worker_prompted(task, cfg) if kind == "prompted" else worker_peft(task, cfg, kind)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
