"""TensorRT-LLM interop: bank prompts as the prompt-embedding table of TensorRT-LLM's p-tuning, and back.

TensorRT-LLM serves NeMo-style p-tuning: an engine built with `--max_prompt_embedding_table_size N`
takes a prompt table of T tasks, (T, P, H) as a NumPy .npy file (`examples/run.py
--prompt_table_path`, the file NeMo's prompts become through `examples/gpt/nemo_prompt_convert.py`),
and a task id per request (`--prompt_tasks 0,1,...`; the executor API's `PromptTuningConfig` holds
the task's (P, H) block). In a request's input ids, id vocab_size + i stands for row i of its task's
block. An export folder holds
    prompt_table.npy    (T, P, H), float16 (the default) or float32: task t's P vectors in block t,
                        tasks in tag order; no padding, every tag of a project has length P
    prompt_tasks.json   tag -> task id and prompt length; the table's shape, dtype and sha256; the
                        base; each tag's ptcli record, so `import` restores the settings
    README.md           how a request names its task, for these tags
Only a prompt TensorRT-LLM runs as ptcli does is exported: one prompt (not an ensemble's vote) at the
input embeddings (not late or deep), placed before the text and nothing else (the `prefix` template).
The .npy is written and read with allow_pickle=False. numpy has no bfloat16, so the table is
float16 or float32; TensorRT-LLM's runners cast it to the engine's dtype when they load it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptcli import __version__
from ptcli.config import check_tag
from ptcli.data.template import parse
from ptcli.enums import Dtype
from ptcli.errors import CompatibilityError, InputError, ProjectError, UsageError, unknown_tags
from ptcli.project import bank
from ptcli.project import manifest as proj
from ptcli.project.manage import Imported
from ptcli.project.manifest import ProjectDir
from ptcli.project.record import PromptRecord
from ptcli.project.storage import project_lock, write_folder
from ptcli.project.trtllm_readme import readme

TABLE, MAP, README = "prompt_table.npy", "prompt_tasks.json", "README.md"
FORMAT, SCHEMA = "ptcli-trtllm-prompt-table", 1
DTYPES = (Dtype.FLOAT16, Dtype.FLOAT32)  # what .npy holds and TensorRT-LLM's runners read
TARGET = "a TensorRT-LLM prompt table"


@dataclass
class TableExported:
    tags: list[str]  # task t is tags[t]
    format: str
    path: str
    files: list[str]
    dtype: str
    shape: list[int]  # (T, P, H)


def is_export(folder: Path) -> bool:
    """Whether `folder` looks like what `export --format trtllm` writes (so `import` needs no --format)."""
    return (folder / MAP).is_file()


def problems(tag: str, record: PromptRecord) -> list[str]:
    """Why TensorRT-LLM cannot run this prompt as ptcli does; none when it can."""
    found = record.engine_problems(tag, TARGET)
    pieces = [p.kind for p in parse(record.template, int(record.num_prompt_tokens or 1))]
    if pieces != ["prompt", "text", "answer"]:
        found.append(
            f"{tag!r} places its prompt by the template {record.template!r}; a TensorRT-LLM request's virtual tokens "
            "come first, before text tokenized whole"
        )
    return found


def export(
    project: ProjectDir, tags: list[str], out: Path, dtype: Dtype = Dtype.FLOAT16, force: bool = False
) -> TableExported:
    """Write `out/` (prompt_table.npy, prompt_tasks.json, README.md) for `tags` (none: every tag of the bank)."""
    import numpy as np

    if dtype not in DTYPES:
        raise UsageError(
            f"--dtype {dtype} cannot be stored: a .npy file has no bfloat16",
            hint="use --dtype float16 or float32; TensorRT-LLM casts the table to the engine's dtype when it loads it",
        )
    names = sorted({check_tag(t) for t in tags} or bank.tags(project))  # task ids in tag order: the same for a bank
    if not names:
        raise ProjectError("the bank is empty: there is no prompt to export", hint="tune one: ptcli tune --tag TAG")
    unknown = [t for t in names if t not in bank.tags(project)]
    if unknown:
        raise unknown_tags(unknown, bank.tags(project))
    records = {t: bank.read_meta(project, t).record for t in names}
    refused = [p for t in names for p in problems(t, records[t])]
    if refused:
        templated = any(not records[t].engine_problems(t, TARGET) and problems(t, records[t]) for t in names)
        raise UsageError(
            f"cannot export to {TARGET}: " + "; ".join(refused),
            hint="answer those tags with `ptcli infer` or `ptcli serve`"
            + ("; a template prompt's rows can go to vLLM as input embeddings (`ptcli embed`)" if templated else ""),
        )
    _check_out(out, force)
    table = np.stack([bank.get(project, t)[0].numpy() for t in names])  # (T, P, H) float32
    limit = float(np.finfo(np.float16).max)
    if dtype is Dtype.FLOAT16 and float(np.abs(table).max()) > limit:
        raise UsageError(
            f"the prompts hold values up to {float(np.abs(table).max()):.4g}, beyond float16's {limit:.0f}",
            hint="export with --dtype float32",
        )
    buf = io.BytesIO()
    np.save(buf, table.astype(np.dtype(str(dtype))), allow_pickle=False)
    blob = buf.getvalue()
    meta = _map(project, names, records, dtype, list(table.shape), hashlib.sha256(blob).hexdigest())
    text = readme(meta, TABLE, MAP)
    write_folder(out, {TABLE: blob, MAP: (json.dumps(meta, indent=2) + "\n").encode(), README: text.encode()})
    return TableExported(
        names, "trtllm", str(out), [str(out / n) for n in (TABLE, MAP, README)], str(dtype), meta["shape"]
    )


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"{out} is a file; a TensorRT-LLM export is a folder", hint="pass a folder path (it is created if missing)"
        )
    present = [str(out / n) for n in (TABLE, MAP, README) if (out / n).exists()]
    if present and not force:
        raise UsageError(
            f"{out} already holds an export ({', '.join(present)})",
            hint="pass --force to overwrite it, or choose another folder",
        )


def _map(
    project: ProjectDir,
    names: list[str],
    records: dict[str, PromptRecord],
    dtype: Dtype,
    shape: list[int],
    sha256: str,
) -> dict[str, Any]:
    """prompt_tasks.json: what a client needs (tag -> task id, prompt length), then what `import` checks."""
    P = project.num_prompt_tokens
    return {
        "format": FORMAT,
        "schema_version": SCHEMA,
        "made_by": f"ptcli {__version__}",
        "tasks": {t: {"task_id": i, "prompt_length": P} for i, t in enumerate(names)},
        "table": TABLE,
        "shape": shape,
        "dtype": str(dtype),
        "sha256": sha256,
        "max_prompt_embedding_table_size": len(names) * P,  # the engine's build flag must be at least this
        "base": {
            "ref": project.base.ref,
            "fingerprint": project.base.fingerprint,
            "hidden_size": project.base.hidden_size,
        },
        "records": {t: records[t].to_json() for t in names},
    }


def _read_map(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        raise InputError(f"{folder} {what}; a TensorRT-LLM export is a folder holding {MAP} and {TABLE}")
    path = folder / MAP
    if not path.is_file():
        raise InputError(
            f"{folder} holds no {MAP}; it is not a folder made by `ptcli export --format trtllm`",
            hint="a table from elsewhere names no tags or base, so ptcli cannot check it",
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("tasks"), dict):
        raise InputError(f"{path} is not a ptcli TensorRT-LLM task map (format {FORMAT!r} with tasks)")
    return meta


def _read_table(folder: Path, meta: dict[str, Any]):
    """The table (T, P, H) as float32, after its checksum, dtype and shape checks. Never unpickles."""
    import numpy as np

    path = folder / TABLE
    if not path.is_file():
        raise InputError(f"{folder} holds no {TABLE}")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CompatibilityError(
            f"{path} does not match the sha256 in {folder / MAP}: it changed after `ptcli export`",
            hint="export it again from its project",
        )
    try:
        table = np.load(io.BytesIO(blob), allow_pickle=False)
    except ValueError as e:  # an object array, or not a .npy at all
        raise InputError(f"{path} is not a plain .npy array ({e})") from e
    if str(table.dtype) not in Dtype.values() or list(table.shape) != meta.get("shape") or table.ndim != 3:
        raise CompatibilityError(
            f"{path} is {table.dtype} {list(table.shape)}; {folder / MAP} says {meta.get('dtype')} {meta.get('shape')}"
        )
    return table.astype(np.float32)


def import_table(project: ProjectDir, folder: Path, tag: str | None = None) -> list[Imported]:
    """Add every task of an export folder to the bank, under its tag (or `tag`, for a one-task folder), float32.

    Each prompt comes back with its record after the base and length checks of `ptcli import`; its values are the
    table's (a float16 export rounds them), and its record says so in `imported_from`. All or nothing.
    """
    import torch

    meta = _read_map(folder)
    table = _read_table(folder, meta)
    tasks: dict[str, Any] = meta["tasks"]
    if tag is not None and len(tasks) != 1:
        raise UsageError(f"--tag names one prompt; {folder} holds {len(tasks)} tasks ({', '.join(tasks)})")
    plan: dict[str, tuple[int, PromptRecord]] = {}
    for old, task in tasks.items():
        raw = meta.get("records", {}).get(old)
        if not isinstance(task, dict) or not isinstance(task.get("task_id"), int) or not isinstance(raw, dict):
            raise InputError(f"{folder / MAP}: task {old!r} has no task id or no ptcli record")
        record = PromptRecord.from_json(raw)
        bank.check_compatible(project, record, f"{folder}: task {old!r}")
        plan[check_tag(tag or old)] = task["task_id"], record
    with project_lock(project.root, f"ptcli import {folder}"):
        p = proj.load(project.root)
        taken = [t for t in plan if bank.path_of(p, t).exists()]
        if taken:
            raise ProjectError(
                f"tag{'s' if len(taken) > 1 else ''} {', '.join(map(repr, taken))} already in the bank",
                hint="import a one-task folder under another name with --tag NEW, or `ptcli remove-tag TAG` first",
            )
        out: list[Imported] = []
        try:
            for new, (task_id, record) in plan.items():
                origin = {"format": "trtllm", "path": str(folder.resolve()), "task_id": task_id, "dtype": meta["dtype"]}
                prompt = torch.from_numpy(table[task_id].copy())  # (P, H)
                path = bank.put(p, new, prompt, dataclasses.replace(record, imported_from=origin))
                out.append(Imported(new, "trtllm", str(folder), str(path)))
        except BaseException:
            for done in out:  # all or nothing: a failed write (a full disk) takes the tags it added back out
                Path(done.path).unlink(missing_ok=True)
            raise
        return out
