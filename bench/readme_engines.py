"""README's "Running prompts elsewhere" table, from the committed results (a test keeps README equal to it).

    python bench/readme_engines.py     # print the table

Speed and memory: `bench/speed.py --sections infer` (mixed-tag rows, `speed.json`); agreement with the
torch path: `bench/engines.py` (`engines.json`, every file and mode); serving: `bench/speed.py --sections
serve` (`speed.json`, requests/s at each client count against torch's).
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = {"ptcli-llama.cpp-bf16": "llama.cpp-bf16", "ptcli-llama.cpp": "llama.cpp"}  # speed.json -> the others


def _span(values: list[float], fmt: str) -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def measured(tool: str, speed: dict, engines: dict) -> str:
    """The "as measured here" cell of one llama.cpp row."""
    name = ENGINES[tool]
    ratio = speed[f"infer_p100_{tool}_examples_per_s"] / speed["infer_p100_ptcli_examples_per_s"]
    rss = speed[f"infer_p100_{tool}_peak_rss_mb"] / speed["infer_p100_ptcli_peak_rss_mb"]
    agree = [100 * run["agreement"][name] for run in engines["runs"].values()]
    runs = speed["serve_engines"]["runs"]
    torch = {r["concurrency"]: r["req_per_s"] for r in runs if r["engine"] == "torch"}
    served = [r["req_per_s"] / torch[r["concurrency"]] for r in runs if r["engine"] == name]
    return (
        f"{ratio:.2f}x torch's speed, {rss:.2f}x its memory; same answer on "
        f"{_span(agree, '.1f')} % of rows; `serve` {_span(served, '.1f')}x its req/s"
    )


def table() -> str:
    speed, engines = (json.loads((RESULTS / f"{n}.json").read_text()) for n in ("speed", "engines"))
    rows = [
        ("tune; late and deep prompts; any base", "ptcli's engine (default, `--engine torch`)",
         f"mixed tags: {speed['infer_p100_ptcli_examples_per_s']:.1f} rows/s"),
        ("a GGUF base on a CPU", "`ptcli infer/serve --engine llama.cpp --llama-weights bf16`",
         measured("ptcli-llama.cpp-bf16", speed, engines)),
        ("the least memory", "`--engine llama.cpp` (the file's Q4_1)",
         measured("ptcli-llama.cpp", speed, engines)),
        ("serve at scale with TensorRT-LLM", "`ptcli export --format trtllm` (prompt table + task ids)",
         "not run here (no GPU)"),
        ("serve with vLLM (`--enable-prompt-embeds`)", "`ptcli embed` (rows' input embeddings)", "not run here"),
    ]  # fmt: skip
    lines = ["| situation | use | as measured here |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


if __name__ == "__main__":
    print(table())
