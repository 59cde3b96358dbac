"""How much of a task the frozen base already knows: a linear probe on its hidden states.

A soft prompt can only steer what the frozen model computes, so the accuracy of a logistic
regression on the model's own features bounds what a prompt may hope for, and says whether a
prompt that stays at the class ratio failed to learn or had nothing to find. Features per row:
the last token's hidden state and the mean over the row's tokens, at every `--layer-stride`-th
layer. Trained on the first `--train-rows` rows of train.jsonl, scored on the val file
(SST-2: val_sentences.jsonl), for a few L2 weights. No test set is read.

    python bench/probe.py --tasks RTE --train-rows 1200    # about 7 min on 2 cores

Writes bench/results/probe.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import datadir
import torch

from ptcli.lm.base import load_base

ROOT = Path(__file__).resolve().parent.parent
VAL = {"SST2": "val_sentences.jsonl"}
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)


def rows(path: Path, limit: int | None = None) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:limit]]


@torch.no_grad()
def features(model, tok, texts: list[str], stride: int, batch: int = 16) -> torch.Tensor:
    """(N, 2 * L' * H): last-token and mean hidden states at every stride-th layer (L' layers)."""
    if tok.pad_token is None:  # many bases ship without one; padded positions are masked out below
        tok.pad_token = tok.eos_token
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(
            texts[i : i + batch], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        hs = model(**enc, output_hidden_states=True).hidden_states[::stride]  # L' x (B, T, H)
        m = enc.attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        last = torch.stack([h[:, -1] for h in hs], 1)  # (B, L', H); left padding puts the last token at -1
        mean = torch.stack([(h * m).sum(1) / m.sum(1) for h in hs], 1)  # (B, L', H)
        out.append(torch.cat([last.flatten(1), mean.flatten(1)], 1))
    return torch.cat(out)


def fit(x: torch.Tensor, y: torch.Tensor, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression (one class against the rest) with an L2 penalty, by L-BFGS."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + wd * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe_task(model, tok, data: Path, task: str, train_rows: int, stride: int) -> dict:
    train, val = rows(data / task / "train.jsonl", train_rows), rows(data / task / VAL.get(task, "val.jsonl"))
    positive = sorted({r["answer"] for r in train})[-1]  # binary tasks: the later label is class 1
    t0 = time.perf_counter()
    x_tr, x_va = (features(model, tok, [r["text"] for r in rs], stride) for rs in (train, val))
    seconds = time.perf_counter() - t0
    y_tr, y_va = (torch.tensor([r["answer"] == positive for r in rs]).float() for rs in (train, val))
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_va = (x_tr - mu) / sd, (x_va - mu) / sd
    fits = []
    for wd in WEIGHT_DECAYS:
        w, b = fit(x_tr, y_tr, wd)
        acc = [(((x @ w + b) > 0).float() == y).float().mean().item() for x, y in ((x_tr, y_tr), (x_va, y_va))]
        fits.append({"weight_decay": wd, "train_acc": round(acc[0], 4), "val_acc": round(acc[1], 4)})
    majority = max(y_va.mean().item(), 1 - y_va.mean().item())
    return {
        "train_rows": len(train),
        "val_rows": len(val),
        "val_file": VAL.get(task, "val.jsonl"),
        "val_majority": round(majority, 4),
        "features": x_tr.shape[1],
        "feature_seconds": round(seconds, 1),
        "fits": fits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["RTE"])
    ap.add_argument("--train-rows", type=int, default=1200)
    ap.add_argument("--layer-stride", type=int, default=6)
    ap.add_argument("--base", default="default")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "probe.json")
    datadir.add_flag(ap)
    args = ap.parse_args()
    data = datadir.check(
        args.data_dir, [f"{t}/{s}" for t in args.tasks for s in ("train.jsonl", VAL.get(t, "val.jsonl"))]
    )
    model, tok = load_base(args.base)
    results = {t: probe_task(model, tok, data, t, args.train_rows, args.layer_stride) for t in args.tasks}
    doc = {
        "date": dt.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "base": args.base,
        "layer_stride": args.layer_stride,
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print("| task | train rows | val majority | " + " | ".join(f"val acc (L2 {wd:g})" for wd in WEIGHT_DECAYS) + " |")
    print("|---|---|---|" + "---|" * len(WEIGHT_DECAYS))
    for t, r in results.items():
        accs = " | ".join(f"{f['val_acc']:.3f}" for f in r["fits"])
        print(f"| {t} | {r['train_rows']} | {r['val_majority']:.3f} | {accs} |")


if __name__ == "__main__":
    main()
