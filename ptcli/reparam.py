"""Reparameterized soft prompts: a small encoder that trains with the prompt, then is thrown away.

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

import torch
from torch import nn

from ptcli.choices import Reparam


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
