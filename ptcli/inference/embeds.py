"""Rows as input embeddings, for an engine that takes them instead of a soft prompt: vLLM's `prompt_embeds`.

vLLM no longer serves soft prompts (its prompt adapters went with the V0 engine); what a server started
with `--enable-prompt-embeds` takes is the whole input as embeddings, one (N, H) tensor per request: the
base64 of `torch.save(tensor)` in the completions API's `prompt_embeds` field (vLLM decodes it with
`torch.load(..., weights_only=True)`, float32, float16 or bfloat16), or `{"prompt_embeds": tensor}` for
`LLM.generate`. `embed` gives, for each row, exactly the input ptcli's own forward feeds the base for it:
the row laid out by its tag's template (`Engine.rows`, the text cut from the left to fit the tag's
--max-seq-length beside the room for --tokens-to-generate, as `ptcli infer` cuts it) and embedded as block 0
reads it (`depth.with_vectors`: token embeddings, the prompt's vectors at its slots). Prompts no single
input can carry, an ensemble's vote or vectors that enter above the input (late, deep), are refused by name.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ptcli.config import BaseOptions
from ptcli.data.jsonl import Record
from ptcli.enums import Mode
from ptcli.errors import UsageError, unknown_tags
from ptcli.inference.engine import Engine, Item, Prompt
from ptcli.inference.infer import records_of
from ptcli.lm.base import load_project_base
from ptcli.lm.depth import with_vectors
from ptcli.project import bank
from ptcli.project.manifest import ProjectDir

TARGET = "vLLM's prompt_embeds"


def embed(
    project: ProjectDir,
    source: str | Path | Iterable[dict[str, Any]],
    *,
    tokens_to_generate: int = 32,
    base: BaseOptions = BaseOptions(),
    status: Callable[[str], None] = lambda _: None,
) -> Iterator[dict[str, Any]]:
    """Each row of `source` (a jsonl path, '-', or dicts) with its input embeddings added, in input order.

    A row gains `prompt_embeds` (base64 of `torch.save` of an (N, H) tensor in the base's dtype), `shape`,
    `dtype`, `text_tokens` and `truncated` (the text tokens kept, and whether the cut dropped any) and
    `max_tokens` (the generation room the budget kept, for the request's own `max_tokens`). Every row is
    checked, and the base loaded, before the first one is given.
    """
    if tokens_to_generate < 1:
        raise UsageError(f"--tokens-to-generate must be at least 1, got {tokens_to_generate}")
    records = records_of(source)
    tags = sorted({r.tag for r in records})
    known = bank.tags(project)
    unknown = [t for t in tags if t not in known]
    if unknown:
        raise unknown_tags(unknown, known)
    refused = [p for t in tags for p in bank.read_meta(project, t).record.engine_problems(t, TARGET)]
    if refused:
        raise UsageError(
            f"cannot write {TARGET}: " + "; ".join(refused),
            hint="answer those tags with `ptcli infer` or `ptcli serve`",
        )
    model, tok = load_project_base(project.base, base, status)
    engine = Engine(model, tok)
    prompts = {t: Prompt.of(t, *bank.get(project, t)) for t in tags}
    items = [Item(prompts[r.tag], r.text, Mode.GENERATE, tokens_to_generate) for r in records]
    texts = tok([r.text for r in records], add_special_tokens=False).input_ids
    laid = engine.laid_out(items, texts)  # every row is checked before any is written
    return _rows(engine, records, items, laid, [len(t) for t in texts], tokens_to_generate)


def _rows(
    engine: Engine, records: list[Record], items: list[Item], seqs: list[list[int]], lengths: list[int], room: int
) -> Iterator[dict[str, Any]]:
    for r, it, s, n in zip(records, items, seqs, lengths):
        layout = engine.layout(it.prompt)
        x = input_embeds(engine.model, it.prompt.members[0], s, layout.prefix)  # (N, H)
        kept = len(s) - sum(t < 0 for t in s) - (layout.overhead() - layout.P)  # text tokens left after the cut
        yield {
            **r.row,
            "prompt_embeds": encode(x),
            "shape": list(x.shape),
            "dtype": str(x.dtype).removeprefix("torch."),
            "text_tokens": kept,
            "truncated": kept < n,
            "max_tokens": room,
        }


@torch.inference_mode()
def input_embeds(model, prompt: torch.Tensor, seq: list[int], prefix: bool) -> torch.Tensor:
    """A row's input embeddings (N, H) as block 0 reads them: the prompt (P, H) in front of a prefix-template row
    (whose ids leave it implicit), or at the slots -(j+1) a template row holds; the base's dtype."""
    emb = model.get_input_embeddings()
    lead = [-(j + 1) for j in range(prompt.shape[0])] if prefix else []
    ids = torch.tensor([lead + seq], device=emb.weight.device)  # (1, N); prompt vector j is -(j+1)
    slot = torch.where(ids < 0, -ids - 1, -1)  # (1, N): which prompt vector sits here (-1: a token)
    rows = prompt.to(device=emb.weight.device, dtype=emb.weight.dtype).unsqueeze(0)  # (1, P, H)
    return with_vectors(emb(ids.clamp(min=0)), slot, rows)[0]  # (N, H)


def encode(x: torch.Tensor) -> str:
    """vLLM's wire form of a prompt_embeds tensor: base64 of `torch.save`. The tensor is cloned onto the CPU
    first, so the file holds its own N*H values and not a larger storage it might view."""
    buf = io.BytesIO()
    torch.save(x.detach().cpu().clone(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")
