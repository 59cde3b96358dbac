"""The trainable soft prompt: its initial vectors, and its reparameterization.

Reparameterized prompts train through a small encoder that is thrown away after training:

  none      the prompt vectors are the parameters (Lester et al.)
  residual  P + MLP(P), the MLP's last layer starting at zero, so step 0 is the initial prompt
            exactly (Razdaibiedina et al., ACL 2023, without their LayerNorm)
  mlp       MLP(E): P-tuning's MLP encoder (Liu et al. 2021; PEFT's PromptEncoder)
  lstm      MLP(BiLSTM(E)): P-tuning's LSTM encoder

Each slot of the stack (a tag or an ensemble member) has its own encoder. After training
the encoder's output *is* the prompt: the bank stores it as a plain (P, H) tensor, so infer,
export and import never see an encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ptcli.data.encode import ANSWER_PREFIX
from ptcli.enums import Init, Reparam
from ptcli.errors import ModelError
from ptcli.lm.depth import depth_of
from ptcli.lm.frozen import lifted

if TYPE_CHECKING:
    from ptcli.tuning.task import Task


def _mlp(h: int, inner: int, zero_last: bool) -> nn.Sequential:
    first, last = nn.Linear(h, inner), nn.Linear(inner, h)  # in this order: the seed draws first's weights first
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(first, nn.ReLU(), last)


class _Encoder(nn.Module):
    def __init__(self, kind: str, h: int, inner: int):
        super().__init__()
        self.kind = kind
        if kind == Reparam.LSTM:
            self.lstm = nn.LSTM(h, inner // 2, num_layers=2, bidirectional=True, batch_first=True)
            self.head = _mlp(inner, inner, False)
            self.out = nn.Linear(inner, h)
        else:
            self.net = _mlp(h, inner, zero_last=kind == Reparam.RESIDUAL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (P, H) -> (P, H)
        if self.kind == Reparam.RESIDUAL:
            return x + self.net(x)
        if self.kind == Reparam.MLP:
            return self.net(x)
        y, _ = self.lstm(x.unsqueeze(0))  # (1, P, inner)
        return self.out(torch.relu(self.head(y[0])))  # (P, H)


class SoftPrompt(nn.Module):
    """The only trainable weights: a stack of prompts (S, P, H), and their encoders when reparameterized."""

    def __init__(self, init: torch.Tensor, reparam: str = Reparam.NONE, inner: int = 0, seed: int = 0):
        super().__init__()
        self.weight = nn.Parameter(init.detach().float().clone())  # (S, P, H) or (P, H)
        self.reparam = reparam
        if reparam != Reparam.NONE:
            slots = init.shape[0] if init.dim() == 3 else 1
            h = init.shape[-1]
            with torch.random.fork_rng(devices=[]):  # the same seed gives the same encoders: runs repeat exactly
                torch.manual_seed(seed)
                self.encoders = nn.ModuleList(_Encoder(reparam, h, inner or h) for _ in range(slots))

    def forward(self) -> torch.Tensor:
        if self.reparam == Reparam.NONE:
            return self.weight
        if self.weight.dim() == 2:
            return self.encoders[0](self.weight)
        return torch.stack([enc(w) for enc, w in zip(self.encoders, self.weight)])  # (S, P, H)


def init_prompt(
    model, tok, n: int, method: str, text: str | None, seed: int, labels: list[str] | None = None
) -> torch.Tensor:
    """Initial soft prompt (P, H), float32.

    text:   tokenize without special tokens, tile or clip to P, copy those vocabulary embeddings.
    labels: one token per class label (the mean embedding of its tokens, as the answer is
            written), then sampled vocabulary for the rest: Lester et al.'s class-label init.
    vocab:  embeddings of P tokens drawn from the 5000 lowest ids (early BPE merges: frequent tokens).
    random: normal draws with the per-dimension mean and std of the vocabulary embeddings.
    """
    table = model.get_input_embeddings().weight.detach().float()  # (V, H)
    g = torch.Generator().manual_seed(seed)
    if method == Init.TEXT:
        ids = tok(text or "", add_special_tokens=False).input_ids
        if not ids:
            raise ModelError(f"--init-text {text!r} produced no tokens")
        ids = (ids * (n // len(ids) + 1))[:n]
        return table[torch.tensor(ids)].clone()
    if method == Init.RANDOM:
        return table.mean(0) + table.std(0) * torch.randn(n, table.shape[1], generator=g)
    sampled = table[torch.randint(0, min(5000, table.shape[0]), (n,), generator=g)].clone()  # (P, H)
    if method == Init.LABELS:
        if not labels:
            raise ModelError(
                "--init labels needs a closed answer set", hint="the training answers are too varied; use --init text"
            )
        for i, ids in enumerate(
            tok([ANSWER_PREFIX + label for label in labels[:n]], add_special_tokens=False).input_ids
        ):
            sampled[i] = table[torch.tensor(ids)].mean(0)
    return sampled


def make_prompt(model: Any, tok: Any, tasks: list[Task], P: int) -> SoftPrompt:
    """The (S, D*P, H) prompt stack, each slot initialised by its tag's --init (member k with seed + k)."""
    run = tasks[0].cfg
    inits = [
        init_prompt(model, tok, P, t.cfg.init, t.init_text, run.seed + k, t.choices)
        for t in tasks
        for k in range(run.ensemble)
    ]
    depth = depth_of(model, run.prompt_layer, run.deep)
    if run.prompt_layer or depth > 1:  # a late or deep prompt starts as its init stands at its blocks
        inits = [lifted(model, run.prompt_layer, v, depth) for v in inits]  # each (D*P, H)
    return SoftPrompt(torch.stack(inits), run.reparam, seed=run.seed)
