"""What machine a benchmark ran on, with one number that makes runs of different machines comparable.

Time budgets ("20 minutes solo on 2 cores") hold a different number of steps on a different VM: the
RTE run of 2026-12-03 took 294 steps where the one of 2026-12-02 took 613, and answering the same 249
rows took 65.5 s against 32.0 s. `matmul_gflops` (float32 matrix products on the threads a benchmark
uses) goes into every result's `machine` block so a reader can tell a slower machine from a slower
recipe.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def matmul_gflops(threads: int | None = None, n: int = 1024, reps: int = 8, trials: int = 5) -> float:
    """Median GFLOP/s of `reps` (n, n) @ (n, n) float32 products over `trials`, on `threads` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        rates = []
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            rates.append(2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
        return round(statistics.median(rates), 1)
    finally:
        torch.set_num_threads(before)


def describe(threads: int | None = None) -> dict:
    """The `machine` block of a result: cores, platform, CPU model and the matmul reference."""
    info = _cpuinfo()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "isa": [f for f in ISA if f in flags],  # what llama.cpp's and torch's kernels pick their paths by
        "platform": platform.platform(),
        "matmul_gflops": matmul_gflops(threads),
    }


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError:
        return []
