"""scripts/zero_shot.sh, the demo's zero-shot column, on a tiny model instead of the default one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTION = "is this review positive or negative"

pytestmark = pytest.mark.slow  # four ptcli subprocesses


def _rows(split: str, tag: str, n: int) -> str:
    lines = (ROOT / "examples" / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return "".join([line + "\n" for line in lines if json.loads(line)["prompt_tag"] == tag][:n])


def test_zero_shot_scores_the_instruction_as_plain_text(tiny_llama: Path, tmp_path: Path) -> None:
    files = {}
    for split, n in (("train", 16), ("valid", 4), ("test", 40)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text(_rows(split, "reviews", n) + ("" if split != "test" else _rows(split, "topic", 3)))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proj = tmp_path / "zs"
    args = [str(proj), str(tiny_llama), "reviews", INSTRUCTION, *(str(files[s]) for s in ("train", "valid", "test"))]
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "zero_shot.sh"), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    accuracy = json.loads(r.stdout)["accuracy"]
    assert set(accuracy) == {"reviews"}  # the other tag's test rows are left out
    assert accuracy["reviews"]["total"] == len(_rows("test", "reviews", 40).splitlines())
    # The untrained prompt is the instruction's token embeddings, one vector per token: plain text, no tiling.
    ids = AutoTokenizer.from_pretrained(tiny_llama).encode(INSTRUCTION, add_special_tokens=False)
    table = AutoModelForCausalLM.from_pretrained(tiny_llama).get_input_embeddings().weight.detach().float()
    prompt = load_file(proj / "bank" / "reviews.safetensors")["prompt"]
    assert prompt.shape == (len(ids), table.shape[1])
    assert (prompt == table[ids]).all()
