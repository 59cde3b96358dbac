"""PEFT interop: a bank prompt as a PEFT prompt-tuning adapter folder, and back.

PEFT (huggingface/peft, `tuners/prompt_tuning`) stores a prompt-tuning adapter as
    adapter_config.json         peft_type PROMPT_TUNING, task_type CAUSAL_LM, num_virtual_tokens P,
                                token_dim H, num_transformer_submodules 1, base_model_name_or_path, ...
    adapter_model.safetensors   one tensor `prompt_embeddings` (P, H)
`PeftModelForCausalLM` prepends those P vectors to the input embeddings, with ones in the
attention mask and default positions: ptcli's layout for an unpadded row. So the same
vectors give the same outputs, and export/import only has to move them.

ptcli also writes its own record into the adapter's safetensors header (PEFT ignores it),
so an adapter exported by ptcli comes back with its settings, metrics, base fingerprint and
checksum. Adapters from elsewhere carry none of that: ptcli checks what it can (type,
prompt length, hidden size) and says which base the adapter names. `.bin` adapters are
pickles and are never read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from ptcli.config import TaskConfig, check_tag
from ptcli.data.template import NAMED, PREFIX
from ptcli.errors import CompatibilityError, InputError, UsageError
from ptcli.project import bank
from ptcli.project.card import card
from ptcli.project.manage import Exported, Imported, new_tag_slot
from ptcli.project.manifest import ProjectDir, now
from ptcli.project.record import PromptRecord
from ptcli.project.storage import write_folder

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
KEY = "prompt_embeddings"
DEFAULT_MAX_SEQ_LENGTH = next(f.default for f in fields(TaskConfig) if f.name == "max_seq_length")


def _base_source(project: ProjectDir) -> str:
    """What `from_pretrained` should load for this project's base: a local folder or a hub id."""
    from ptcli.lm.source import resolve  # the default base and .gguf files live as converted folders in the cache

    return resolve(project.base.ref, status=lambda _: None)


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if k in config), None)


def adapter_config(project: ProjectDir, base_source: str) -> dict[str, Any]:
    """PEFT's PromptTuningConfig fields, as `PeftModel.save_pretrained` writes them (sorted keys).

    `prompt_tuning_init` is RANDOM whatever ptcli's init was: the adapter carries trained
    vectors, PEFT's init only shapes a fresh adapter, and TEXT would make PEFT load a
    tokenizer. ptcli's own init is in the record in the weights file.
    """
    hf: dict[str, Any] = {}
    config_json = Path(base_source) / "config.json"
    if config_json.is_file():
        hf = json.loads(config_json.read_text(encoding="utf-8"))
        hf = hf.get("text_config", hf)
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_source,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": _first(
            hf, "num_attention_heads", "n_head", "num_heads"
        ),  # None: PEFT reads the base at load
        "num_layers": _first(hf, "num_hidden_layers", "num_layers", "n_layer"),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": project.num_prompt_tokens,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": project.base.hidden_size,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def export(project: ProjectDir, tag: str, out: Path, force: bool = False) -> Exported:
    """Write `out/adapter_config.json`, `out/adapter_model.safetensors` and a model card for a tag's prompt."""
    from safetensors.torch import save as st_save

    prompt, record = bank.get(project, check_tag(tag))  # (P, H) float32, checksum and base checked
    if prompt.dim() == 3:
        raise UsageError(
            f"{tag!r} is an ensemble of {prompt.shape[0]} prompts; a PEFT adapter holds one",
            hint="export it in the ptcli format, or tune a single prompt for PEFT",
        )
    template = record.template
    if NAMED.get(template, template) != PREFIX:
        raise UsageError(
            f"{tag!r} places its prompt by the template {template!r}; a PEFT prompt-tuning adapter only prepends it",
            hint="export it in the ptcli format",
        )
    if record.depth > 1:
        raise UsageError(
            f"{tag!r} is a deep prompt (vectors for {record.depth} blocks, entered as hidden states); a PEFT "
            "prompt-tuning adapter holds input embeddings only",
            hint="export it in the ptcli format",
        )
    if record.prompt_layer:
        raise UsageError(
            f"{tag!r} is a late prompt: it enters before block {record.prompt_layer}, and a PEFT prompt-tuning "
            "adapter enters at the input embeddings",
            hint="export it in the ptcli format",
        )
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"{out} is a file; a PEFT adapter is a folder", hint="pass a folder path (it is created if missing)"
        )
    present = [str(out / n) for n in (CONFIG, WEIGHTS, "README.md") if (out / n).exists()]
    if present and not force:
        raise UsageError(
            f"{out} already holds an adapter ({', '.join(present)})",
            hint="pass --force to overwrite it, or choose another folder",
        )
    config = adapter_config(project, _base_source(project))
    # The tensor bytes are the bank file's own, so the record's sha256 still covers them.
    weights = st_save({KEY: prompt.contiguous()}, metadata={"format": "pt", "ptcli": json.dumps(record.to_json())})
    readme = card(project, record, "peft", str(out)).encode()
    write_folder(
        out,
        {WEIGHTS: weights, CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), "README.md": readme},
    )
    return Exported(tag, "peft", str(out), [str(out / CONFIG), str(out / WEIGHTS), str(out / "README.md")])


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        raise InputError(f"{folder} {what}; a PEFT adapter is a folder holding {CONFIG} and {WEIGHTS}")
    path = folder / CONFIG
    if not path.is_file():
        raise InputError(f"{folder} holds no {CONFIG}; it is not a PEFT adapter")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a JSON object")
    return config


def check_config(folder: Path, config: dict[str, Any], project: ProjectDir) -> None:
    """Refuse adapters ptcli cannot use: other PEFT types, encoder-decoder layouts, other P or H."""
    peft_type, task_type = config.get("peft_type"), config.get("task_type")
    problems = []
    if peft_type != "PROMPT_TUNING":
        problems.append(f"peft_type is {peft_type!r}; ptcli imports PROMPT_TUNING adapters only")
    if task_type not in (None, "CAUSAL_LM"):
        problems.append(f"task_type is {task_type!r}; ptcli prompts are for causal LMs (CAUSAL_LM)")
    if config.get("num_transformer_submodules") not in (None, 1):
        problems.append(
            f"num_transformer_submodules is {config.get('num_transformer_submodules')!r}; a decoder-only model has 1"
        )
    if problems:
        raise InputError(f"{folder / CONFIG} describes an adapter ptcli cannot import", problems)
    n, dim = config.get("num_virtual_tokens"), config.get("token_dim")
    if n != project.num_prompt_tokens:
        raise CompatibilityError(
            f"{folder} has {n} virtual tokens; this project uses {project.num_prompt_tokens}",
            hint="a project has one prompt length; import into a project made with that length",
        )
    if dim is not None and dim != project.base.hidden_size:
        raise CompatibilityError(
            f"{folder} was made for base {config.get('base_model_name_or_path')!r} (token_dim {dim}); "
            f"this project's base is {project.base.ref!r} (hidden size {project.base.hidden_size})",
            hint="a soft prompt only works with the base model it was tuned on",
        )


def _read_weights(folder: Path):
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS
    if not path.is_file():
        if (folder / PICKLE).is_file():
            raise InputError(
                f"{folder} holds {PICKLE}, a pickle; ptcli never loads pickles (they can run code)",
                hint=f"if you trust it, convert it in Python: "
                f"PeftModel.from_pretrained(base, '{folder}').save_pretrained(OUT) writes {WEIGHTS}",
            )
        raise InputError(f"{folder} holds no {WEIGHTS}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            if KEY not in keys:
                raise InputError(f"{path} has no tensor {KEY!r} (it has {', '.join(keys) or 'none'})")
            return f.get_tensor(KEY), metadata
    except SafetensorError as e:
        raise InputError(f"{path} is not a readable safetensors file ({e})") from e


def import_adapter(project: ProjectDir, folder: Path, tag: str | None = None) -> Imported:
    """Add a PEFT prompt-tuning adapter's prompt to the bank (float32), under `tag`.

    An adapter exported by ptcli keeps its record (and its tag, unless `tag` is given) after
    the same base, length and checksum checks as `ptcli import`; any other adapter needs `tag`.
    """
    import hashlib

    config = _read_config(folder)
    check_config(folder, config, project)
    weights, metadata = _read_weights(folder)
    P, H = project.num_prompt_tokens, project.base.hidden_size
    if tuple(weights.shape) != (P, H):
        raise CompatibilityError(f"{folder / WEIGHTS}: {KEY} is {tuple(weights.shape)}; this project needs ({P}, {H})")
    prompt = weights.float().contiguous()  # (P, H)
    warnings: list[str] = []
    if "ptcli" in metadata:
        try:
            record = PromptRecord.from_json(json.loads(metadata["ptcli"]))
        except (ValueError, TypeError, AttributeError) as e:
            raise InputError(f"{folder / WEIGHTS} has an unreadable ptcli record ({e})") from e
        bank.check_compatible(project, record, str(folder))
        if hashlib.sha256(prompt.numpy().tobytes()).hexdigest() != record.sha256:
            raise CompatibilityError(
                f"{folder / WEIGHTS} does not match its ptcli record: the prompt changed after `ptcli export`",
                hint="if it was retrained on purpose, delete the ptcli entry from its metadata "
                "(PEFT's own save does) and import it with --tag",
            )
        meta = dataclasses.replace(record, sha256=None)
        tag = tag or record.tag
        if not tag:
            raise InputError(f"{folder / WEIGHTS} names no tag", hint="import it with --tag")
    else:
        if tag is None:
            raise UsageError(f"--tag is required: {folder} is a PEFT adapter, which does not name its task")
        named = config.get("base_model_name_or_path")
        if named not in (None, project.base.ref):
            warnings.append(
                f"the adapter names base {named!r}; this project's base is {project.base.ref!r}. "
                "ptcli checked the prompt length and hidden size, not that the weights are the same"
            )
        meta = PromptRecord(
            init="peft",
            imported_from={
                "format": "peft",
                "path": str(folder.resolve()),
                "base_model_name_or_path": named,
                "prompt_tuning_init": config.get("prompt_tuning_init"),
            },
            config={"max_seq_length": DEFAULT_MAX_SEQ_LENGTH},  # what `infer` budgets text with; PEFT records none
            created=now(),
            updated=now(),
        )
    with new_tag_slot(project, tag, str(folder)) as p:
        path = bank.put(p, tag, prompt, meta)
    return Imported(tag, "peft", str(folder), str(path), warnings)
