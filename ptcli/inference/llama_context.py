"""A llama.cpp context for ptcli's engine: the GGUF model, one unified KV cache, batches of tokens or vectors.

The ctypes side of `--engine llama.cpp` (llama-cpp-python's low-level API, pinned by the
`llamacpp` extra): `decode` takes (sequence, position, token or vector) entries, runs them in
batches of up to n_ctx, and returns the logits of the positions asked for, read in one copy.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ptcli.config import BaseOptions
from ptcli.enums import Dtype, LlamaWeights
from ptcli.errors import ModelError, UsageError
from ptcli.project.manifest import ProjectDir

MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids a context may hold
N_CTX = 2048  # cells a context starts with (Context.fit grows it)
EXTRA = "pip install 'ptcli[llamacpp]' (it compiles llama.cpp: about 4 minutes on 2 cores)"
Logits = dict[tuple[int, int], np.ndarray]  # (sequence, position) -> (V,)


def gguf_of(project: ProjectDir) -> Path:
    """The GGUF file of the project's base, or UsageError: llama.cpp reads nothing else."""
    from ptcli.lm.source import DEFAULT_REF, default_gguf, gguf_in

    ref = project.base.ref
    gguf = default_gguf() if ref == DEFAULT_REF else gguf_in(Path(ref))
    if gguf is None:
        raise UsageError(
            f"--engine llama.cpp runs a GGUF base; this project's base is {ref!r}, not a .gguf file",
            hint="use --engine torch (the default), or init a project on the model's .gguf file",
        )
    return gguf


def check_engine(project: ProjectDir, base: BaseOptions, world: int) -> Path:
    """What --engine llama.cpp needs, refused by name before any row is read: the extra, one process on the
    CPU, the GGUF file's own types, a GGUF base. Returns that file."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise UsageError(f"--engine llama.cpp needs llama-cpp-python: {EXTRA}")
    if world > 1 or base.device_map:
        raise UsageError("--engine llama.cpp runs in one process on the CPU: drop --devices and --device-map")
    if base.dtype != Dtype.FLOAT32:
        raise UsageError("--dtype applies to --engine torch; llama.cpp computes with the GGUF file's own types")
    return gguf_of(project)


def check_fingerprint(project: ProjectDir, source: Path, status: Callable[[str], None]) -> None:
    """Refuse a GGUF whose weights are not the ones `ptcli init` recorded, as the torch path does.

    The fingerprint is of the converted weights; it is computed once per converted copy and kept beside it.
    """
    from ptcli.errors import CompatibilityError
    from ptcli.project.storage import atomic_write

    kept = source / "ptcli-fingerprint"
    if kept.is_file():
        found = kept.read_text().strip()
    else:
        from ptcli.lm.base import fingerprint, load_base

        status("checking the base's fingerprint (once for this GGUF file)")
        model, _ = load_base(project.base.ref, BaseOptions(), status)
        found = fingerprint(model)
        del model
        atomic_write(kept, found.encode())
    if found != project.base.fingerprint:
        raise CompatibilityError(
            f"the base model at {project.base.ref!r} has changed since `ptcli init` (fingerprint mismatch)",
            hint="its prompts would not fit it; init a new project for the new weights",
        )


FTYPES = {  # --llama-weights -> llama.cpp's llama_ftype
    LlamaWeights.BF16: "LLAMA_FTYPE_MOSTLY_BF16",
    LlamaWeights.Q8_0: "LLAMA_FTYPE_MOSTLY_Q8_0",
    LlamaWeights.F32: "LLAMA_FTYPE_ALL_F32",
}


def weights_of(gguf: Path, source: Path, kind: LlamaWeights, status: Callable[[str], None]) -> Path:
    """The GGUF llama.cpp loads for --llama-weights: the file itself, or its re-encoding by llama.cpp's quantizer,
    made once and kept in the converted copy's folder (keyed by the file's path, size and mtime: a changed file
    gets a new folder). The re-encoding is of the file's dequantized values, so it holds the weights the
    fingerprint checked, rounded to `kind`."""
    if kind == LlamaWeights.FILE:
        return gguf
    dest = source / f"ptcli-{kind}.gguf"
    if dest.is_file():
        return dest
    import llama_cpp as L

    status(f"re-encoding {gguf.name} as {kind} once (llama.cpp's quantizer); kept as {dest}")
    L.llama_log_set(_QUIET, ctypes.c_void_p())
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, FTYPES[kind])
    params.allow_requantize = True  # the file's blocks are dequantized, then written as `kind`
    params.nthread = os.cpu_count() or 1
    tmp = source / f".ptcli-{kind}-{os.getpid()}.gguf.tmp"
    try:
        if L.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise ModelError(
                f"llama.cpp could not re-encode {gguf} as {kind}; nothing was kept",
                hint=f"check the free space in {source}, or use --llama-weights file",
            )
        os.replace(tmp, dest)  # another process may have finished first: its copy is the same
    finally:
        tmp.unlink(missing_ok=True)
    return dest


class Context:
    """The model and its cache. `copy` shares a sequence's cells with another; `clear` empties the cache.

    The cache starts at N_CTX cells and grows (`fit`) when one row needs more: llama.cpp's KV
    cache and attention buffers are sized by it, and 8192 cells cost this base about 145 MB more
    peak RSS than 2048 (docs/engines.md), for rows that seldom need them.
    """

    def __init__(self, gguf: Path, n_ctx: int = 0, threads: int | None = None):
        try:
            import llama_cpp
        except ImportError as e:
            raise UsageError(f"--engine llama.cpp needs llama-cpp-python: {EXTRA}") from e
        self.L = L = llama_cpp
        L.llama_log_set(_QUIET, ctypes.c_void_p())
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.use_extra_bufts = False  # AMX repacking crashes where the VM offers AMX (seen here); plain CPU kernels
        self.gguf, self.threads = gguf, threads or os.cpu_count() or 1
        self.model = L.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise ModelError(f"llama.cpp cannot load {gguf}")
        self.H = L.llama_model_n_embd(self.model)
        self.V = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_ctx, self.ctx, self.mem = 0, None, None
        self._make(n_ctx or N_CTX)

    def _make(self, n_ctx: int) -> None:
        L = self.L
        params = L.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx
        params.n_ubatch = min(n_ctx, 512)
        params.n_seq_max = MAX_SEQ
        params.kv_unified = True  # one pool of cells: a copied prefix is shared, not duplicated
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise ModelError(f"llama.cpp cannot make a context of {n_ctx} positions for {self.gguf}")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_ctx = n_ctx

    def fit(self, cells: int) -> None:
        """Grow the cache (emptied) to the next power of two that holds `cells`, when it holds fewer."""
        if cells > self.n_ctx:
            self.L.llama_free(self.ctx)
            self._make(1 << (cells - 1).bit_length())

    def close(self) -> None:
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.mem, True)

    def copy(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Sequence `dst` gets `src`'s cells in [p0, p1) (-1: all): shared in the unified cache, not copied."""
        self.L.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def tokens(self, entries: list[tuple[int, int, int]], want: set) -> dict[tuple[int, int], np.ndarray]:
        """Decode (sequence, position, token) entries; logits (V,) of the (sequence, position) pairs in `want`."""
        return self.decode(entries, want, embd=False)

    def embeds(self, entries: list, want: set) -> dict[tuple[int, int], np.ndarray]:
        """Decode (sequence, position, vector (H,)) entries: input embeddings in place of tokens."""
        return self.decode(entries, want, embd=True)

    def decode(self, entries: list, want: set, embd: bool) -> dict[tuple[int, int], np.ndarray]:
        L, got = self.L, dict[tuple[int, int], np.ndarray]()
        for start in range(0, len(entries), self.n_ctx):
            part = entries[start : start + self.n_ctx]
            batch = L.llama_batch_init(len(part), self.H if embd else 0, 1)
            try:
                n = len(part)
                batch.n_tokens = n
                if embd:
                    vecs = np.ascontiguousarray(np.stack([e[2] for e in part]), dtype=np.float32)  # (n, H)
                    ctypes.memmove(batch.embd, vecs.ctypes.data, vecs.nbytes)
                else:
                    ids = np.array([e[2] for e in part], dtype=np.int32)
                    ctypes.memmove(batch.token, ids.ctypes.data, ids.nbytes)
                pos = np.array([e[1] for e in part], dtype=np.int32)
                ctypes.memmove(batch.pos, pos.ctypes.data, pos.nbytes)
                outs = [(e[0], e[1]) in want for e in part]
                for j, e in enumerate(part):
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = e[0]
                    batch.logits[j] = outs[j]
                if L.llama_decode(self.ctx, batch) != 0:
                    raise ModelError("llama.cpp could not decode a batch (its cache is full)")
                n_out = sum(outs)
                if n_out:
                    logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n_out, self.V)).copy()
                    keys = [(e[0], e[1]) for e, o in zip(part, outs) if o]
                    got.update(zip(keys, logits))
            finally:
                L.llama_batch_free(batch)
        return got


def _quiet(level: int, text: bytes, data: ctypes.c_void_p) -> None:
    return None


def _callback():
    import llama_cpp

    return llama_cpp.llama_log_callback(_quiet)


_QUIET = None
try:  # the C callback must outlive every call into llama.cpp
    _QUIET = _callback()
except ImportError:
    pass
