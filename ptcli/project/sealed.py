"""Checksummed safetensors: the one file format of bank prompts and tuning checkpoints.

A sealed file is a safetensors file whose header metadata holds, under "ptcli", a JSON record;
the record's `sha256` covers the data section (the tensor bytes) exactly as it lies in the
file, so a damaged or truncated file is told apart from a whole one without torch. Files are
parsed here with struct and json, never unpickled; `seal` (torch) writes one.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

KEY = "ptcli"  # the header metadata key of the record


class Unreadable(ValueError):
    """Not a whole sealed file; the message says why, as a phrase ("truncated (5 bytes)")."""


def split(blob: bytes, what: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(header, record, data section) of a sealed file, or Unreadable naming `what` it should have been.

    Reads the header only as far as it goes, so a caller may pass the header bytes alone (no data).
    """
    if len(blob) < 8:
        raise Unreadable(f"truncated ({len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise Unreadable("truncated or not a safetensors file")
    try:
        header = json.loads(blob[8 : 8 + n])
        record = json.loads(header["__metadata__"][KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise Unreadable(f"not a ptcli {what} ({e})") from e
    if not isinstance(record, dict):
        raise Unreadable(f"not a ptcli {what} (its record is not an object)")
    return header, record, blob[8 + n :]


def checksum_ok(expected: str | None, data: bytes) -> bool:
    """Whether the data section hashes to the record's sha256."""
    return hashlib.sha256(data).hexdigest() == expected


def seal(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> bytes:
    """The file for `tensors` with `record` in its header, the record's sha256 set to its data section's.

    The data section does not depend on the metadata, so a first serialisation gives the bytes to hash.
    """
    from safetensors.torch import save

    _, _, data = split(save(tensors, metadata={KEY: json.dumps({**record, "sha256": ""})}), "file")
    record["sha256"] = hashlib.sha256(data).hexdigest()
    return save(tensors, metadata={KEY: json.dumps(record)})


def reseal(header: dict[str, Any], record: dict[str, Any], data: bytes) -> bytes:
    """The same tensors (bytes untouched, so the checksum still holds) under another record."""
    header = {**header, "__metadata__": {**header["__metadata__"], KEY: json.dumps(record)}}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads its header to 8 bytes so the data stays aligned
    return struct.pack("<Q", len(head)) + head + data
