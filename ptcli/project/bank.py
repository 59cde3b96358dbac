"""The prompt bank: one self-describing safetensors file per tag.

`bank/TAG.safetensors` holds the tensor `prompt` (P, H), float32, and in its header
metadata a JSON record (settings, metrics, init, timestamps, base fingerprint, and a
sha256 of the tensor bytes). Headers are read without torch, so listing is cheap; files
are never unpickled; writes are atomic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptcli.errors import CompatibilityError, unknown_tags
from ptcli.project.manifest import Project
from ptcli.project.record import PromptRecord
from ptcli.project.storage import atomic_write

if TYPE_CHECKING:
    import torch

ENTRY_SCHEMA = 1
SUFFIX = ".safetensors"


@dataclass
class Entry:
    tag: str
    record: PromptRecord
    path: Path


def path_of(project: Project, tag: str) -> Path:
    return project.bank_dir / f"{tag}{SUFFIX}"


def tags(project: Project) -> list[str]:
    if not project.bank_dir.is_dir():
        return []
    # regular files only: a directory or a FIFO planted in bank/ is not a prompt (and must not hang a read)
    return sorted(
        p.name[: -len(SUFFIX)]
        for p in project.bank_dir.glob(f"*{SUFFIX}")
        if not p.name.startswith(".") and p.is_file()
    )


def _split(path: Path, blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Parse a safetensors file into (header, data section), refusing anything malformed."""
    if len(blob) < 8:
        raise CompatibilityError(f"prompt file {path} is truncated ({len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise CompatibilityError(f"prompt file {path} is truncated or not a safetensors file")
    try:
        header = json.loads(blob[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["ptcli"])
    except (ValueError, KeyError, TypeError) as e:
        raise CompatibilityError(f"prompt file {path} is not a ptcli prompt ({e})") from e
    header["__metadata__"]["ptcli"] = meta
    return header, blob[8 + n :]


def read_meta(project: Project, tag: str) -> Entry:
    """Read only the header: cheap, no torch."""
    path = path_of(project, tag)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        blob = head + f.read(min(n, 10_000_000))
    header, _ = _split(path, blob)
    return Entry(tag, PromptRecord.from_json(header["__metadata__"]["ptcli"]), path)


def check_compatible(project: Project, record: PromptRecord, source: str) -> None:
    """Refuse a prompt made for another base model or prompt length, naming both."""
    base = project.base
    if record.base_fingerprint != base.fingerprint or record.hidden_size != base.hidden_size:
        raise CompatibilityError(
            f"{source} was tuned on base {record.base_ref!r} (fingerprint {str(record.base_fingerprint)[:12]}, "
            f"hidden size {record.hidden_size}); this project's base is {base.ref!r} "
            f"(fingerprint {base.fingerprint[:12]}, hidden size {base.hidden_size})",
            hint="a soft prompt only works with the base model it was tuned on",
        )
    if record.num_prompt_tokens != project.num_prompt_tokens:
        raise CompatibilityError(
            f"{source} has {record.num_prompt_tokens} prompt tokens; this project uses {project.num_prompt_tokens}"
        )


def get(project: Project, tag: str) -> tuple[torch.Tensor, PromptRecord]:
    """Load a prompt (P, H), or an ensemble's (K, P, H), after verifying its checksum and its base model."""
    from safetensors.torch import load as st_load

    path = require(project, tag)
    blob = path.read_bytes()
    header, data = _split(path, blob)
    record = PromptRecord.from_json(header["__metadata__"]["ptcli"])
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise CompatibilityError(f"prompt file {path} is corrupted: its checksum does not match", hint="retune the tag")
    check_compatible(project, record, f"prompt {tag!r}")
    return st_load(blob)["prompt"].float(), record


def put(project: Project, tag: str, prompt: torch.Tensor, record: PromptRecord) -> Path:
    """Atomically write a prompt (P, H) or an ensemble (K, P, H) with its record; the checksum covers the tensor bytes.

    The record's tag, shape and base are set here from the prompt and the project, so they cannot disagree.
    """
    from safetensors.torch import save as st_save

    tensors = {"prompt": prompt.detach().float().cpu().contiguous()}
    record = dataclasses.replace(
        record,
        schema_version=ENTRY_SCHEMA,
        tag=tag,
        num_prompt_tokens=int(prompt.shape[-2]),
        hidden_size=int(prompt.shape[-1]),
        ensemble=int(prompt.shape[0]) if prompt.dim() == 3 else 1,
        base_ref=project.base.ref,
        base_fingerprint=project.base.fingerprint,
        sha256="",
    )
    _, data = _split(Path(tag), st_save(tensors, metadata={"ptcli": json.dumps(record.to_json())}))
    record.sha256 = hashlib.sha256(data).hexdigest()
    path = path_of(project, tag)
    atomic_write(path, st_save(tensors, metadata={"ptcli": json.dumps(record.to_json())}))
    return path


# ---------------------------------------------------------------- whole files, without torch
# Moving a prompt (export, import, rename) never needs its values: the bytes are checked and
# re-labelled here with hashlib and json, so those commands stay as light as `list-tags`.


def require(project: Project, tag: str) -> Path:
    """The path of a tag's prompt file, or the same error `get` raises for an unknown tag."""
    path = path_of(project, tag)
    if not path.is_file():
        raise unknown_tags([tag], tags(project))
    return path


def verify(source: str, blob: bytes) -> tuple[dict[str, Any], bytes, PromptRecord]:
    """Check that `blob` is a whole, intact ptcli prompt; return (header, data section, record).

    A prompt file holds exactly one float32 tensor `prompt` (P, H), or (K, P, H) for an ensemble, that fills the data
    section, and the record's sha256 of those bytes. Anything else is refused.
    """
    header, data = _split(Path(source), blob)
    record = header["__metadata__"]["ptcli"]
    if not isinstance(record, dict):
        raise CompatibilityError(f"{source} is not a ptcli prompt (its record is not an object)")
    spec = header.get("prompt")
    P, H = record.get("num_prompt_tokens"), record.get("hidden_size")
    tensors = sorted(k for k in header if k != "__metadata__")
    if tensors != ["prompt"] or not isinstance(spec, dict) or not isinstance(P, int) or not isinstance(H, int):
        raise CompatibilityError(f"{source} is not a ptcli prompt (tensors: {', '.join(tensors) or 'none'})")
    K = record.get("ensemble", 1)
    shape = [P, H] if K == 1 else [K, P, H]
    if (
        not isinstance(K, int)
        or spec.get("dtype") != "F32"
        or spec.get("shape") != shape
        or spec.get("data_offsets") != [0, len(data)]
        or len(data) != 4 * P * H * K
    ):
        raise CompatibilityError(
            f"{source} is damaged: its tensor is {spec.get('dtype')} {spec.get('shape')} over {len(data)} bytes; "
            f"its record says float32 {tuple(shape)}"
        )
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise CompatibilityError(
            f"{source} is corrupted: its checksum does not match", hint="export it again from its project"
        )
    return header, data, PromptRecord.from_json(record)


def read_verified(project: Project, tag: str) -> tuple[bytes, PromptRecord]:
    """A tag's prompt file as bytes, after the structure and checksum checks of `verify`."""
    path = require(project, tag)
    blob = path.read_bytes()
    _, _, record = verify(str(path), blob)
    return blob, record


def relabel(source: str, blob: bytes, tag: str) -> bytes:
    """The same prompt file with `tag` in its record. The tensor bytes, and so the checksum, are unchanged."""
    header, data, _ = verify(source, blob)
    raw = header["__metadata__"]["ptcli"]  # as stored, keys and all
    header = {**header, "__metadata__": {**header["__metadata__"], "ptcli": json.dumps({**raw, "tag": tag})}}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads its header to 8 bytes so the data stays aligned
    return struct.pack("<Q", len(head)) + head + data
