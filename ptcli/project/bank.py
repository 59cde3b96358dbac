"""The prompt bank: one self-describing safetensors file per tag.

`bank/TAG.safetensors` holds the tensor `prompt` (P, H), float32, and in its header
metadata a JSON record (settings, metrics, init, timestamps, base fingerprint, and a
sha256 of the tensor bytes): a sealed file (sealed.py). Headers are read without torch, so
listing is cheap; files are never unpickled; writes are atomic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptcli.errors import CompatibilityError, unknown_tags
from ptcli.project import sealed
from ptcli.project.manifest import ProjectDir
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


def path_of(project: ProjectDir, tag: str) -> Path:
    return project.bank_dir / f"{tag}{SUFFIX}"


def listing(project: ProjectDir) -> dict[str, os.stat_result]:
    """Every prompt file of the bank by tag, with its stat: `TAG.safetensors`, regular files only.

    A directory or a FIFO planted in bank/ is not a prompt (and must not hang a read); a hidden
    file is a temp file of an atomic write. The running server lists the bank through this too.
    """
    found: dict[str, os.stat_result] = {}
    try:
        entries = list(os.scandir(project.bank_dir))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for e in entries:
        if e.name.endswith(SUFFIX) and not e.name.startswith("."):
            try:
                if e.is_file():
                    found[e.name[: -len(SUFFIX)]] = e.stat()
            except FileNotFoundError:  # renamed or removed since the listing
                continue
    return found


def tags(project: ProjectDir) -> list[str]:
    return sorted(listing(project))


def _split(path: Path, blob: bytes) -> tuple[dict[str, Any], PromptRecord, bytes]:
    """(header, record, data section) of a prompt file, refusing anything malformed."""
    try:
        header, record, data = sealed.split(blob, "prompt")
    except sealed.Unreadable as e:
        raise CompatibilityError(f"prompt file {path} is {e}") from e
    return header, PromptRecord.from_json(record), data


def read_meta(project: ProjectDir, tag: str) -> Entry:
    """Read only the header: cheap, no torch."""
    path = path_of(project, tag)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        blob = head + f.read(min(n, 10_000_000))
    return Entry(tag, _split(path, blob)[1], path)


def check_compatible(project: ProjectDir, record: PromptRecord, source: str) -> None:
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


def get(project: ProjectDir, tag: str, numpy: bool = False) -> tuple[Any, PromptRecord]:
    """Load a prompt (P, H), or an ensemble's (K, P, H), after verifying its checksum and its base model.

    A torch tensor, or with `numpy` a float32 numpy array (the llama.cpp engine runs without torch)."""
    path = require(project, tag)
    blob = path.read_bytes()
    _, record, data = _split(path, blob)
    if not sealed.checksum_ok(record.sha256, data):
        raise CompatibilityError(f"prompt file {path} is corrupted: its checksum does not match", hint="retune the tag")
    check_compatible(project, record, f"prompt {tag!r}")
    if numpy:
        from safetensors.numpy import load as np_load

        return np_load(blob)["prompt"], record  # float32: every prompt file is (_split checked it)
    from safetensors.torch import load as st_load

    return st_load(blob)["prompt"].float(), record


def put(project: ProjectDir, tag: str, prompt: torch.Tensor, record: PromptRecord) -> Path:
    """Atomically write a prompt (P, H) or an ensemble (K, P, H) with its record; the checksum covers the tensor bytes.

    The record's tag, shape and base are set here from the prompt and the project, so they cannot disagree.
    """
    record = dataclasses.replace(
        record,
        schema_version=ENTRY_SCHEMA,
        tag=tag,
        num_prompt_tokens=int(prompt.shape[-2]) // record.depth,
        hidden_size=int(prompt.shape[-1]),
        ensemble=int(prompt.shape[0]) if prompt.dim() == 3 else 1,
        base_ref=project.base.ref,
        base_fingerprint=project.base.fingerprint,
        sha256=None,
    )
    path = path_of(project, tag)
    atomic_write(path, sealed.seal({"prompt": prompt.detach().float().cpu().contiguous()}, record.to_json()))
    return path


# ---------------------------------------------------------------- whole files, without torch
# Moving a prompt (export, import, rename) never needs its values: the bytes are checked and
# re-labelled here with hashlib and json, so those commands stay as light as `list-tags`.


def require(project: ProjectDir, tag: str) -> Path:
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
    header, record, data = _split(Path(source), blob)
    spec = header.get("prompt")
    P, H, K, D = record.num_prompt_tokens, record.hidden_size, record.ensemble, record.depth
    tensors = sorted(k for k in header if k != "__metadata__")
    if tensors != ["prompt"] or not isinstance(spec, dict) or not isinstance(P, int) or not isinstance(H, int):
        raise CompatibilityError(f"{source} is not a ptcli prompt (tensors: {', '.join(tensors) or 'none'})")
    shape = [D * P, H] if K == 1 else [K, D * P, H]
    if (
        not isinstance(K, int)
        or not isinstance(D, int)
        or spec.get("dtype") != "F32"
        or spec.get("shape") != shape
        or spec.get("data_offsets") != [0, len(data)]
        or len(data) != 4 * D * P * H * K
    ):
        raise CompatibilityError(
            f"{source} is damaged: its tensor is {spec.get('dtype')} {spec.get('shape')} over {len(data)} bytes; "
            f"its record says float32 {tuple(shape)}"
        )
    if not sealed.checksum_ok(record.sha256, data):
        raise CompatibilityError(
            f"{source} is corrupted: its checksum does not match", hint="export it again from its project"
        )
    return header, data, record


def read_verified(project: ProjectDir, tag: str) -> tuple[bytes, PromptRecord]:
    """A tag's prompt file as bytes, after the structure and checksum checks of `verify`."""
    path = require(project, tag)
    blob = path.read_bytes()
    _, _, record = verify(str(path), blob)
    return blob, record


def relabel(source: str, blob: bytes, tag: str) -> bytes:
    """The same prompt file with `tag` in its record. The tensor bytes, and so the checksum, are unchanged."""
    header, data, _ = verify(source, blob)
    raw = json.loads(header["__metadata__"][sealed.KEY])  # the record as stored, keys and all
    return sealed.reseal(header, {**raw, "tag": tag}, data)
