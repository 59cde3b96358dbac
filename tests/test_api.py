"""The Python API: the README's example runs as written, and `ptcli infer` gives the rows the API gives."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from clihelp import cli, ok, write_jsonl

from ptcli.api import Project
from ptcli.errors import InputError, ProjectError

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n## Python API\n" in text, "README.md has no '## Python API' section"
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "the Python API section has no python block"
    return block.group(1)


def _rows(tag: str, split: str, n: int) -> list[dict]:
    rows = map(json.loads, (ROOT / "examples" / "data" / f"{split}.jsonl").read_text().splitlines())
    return [r for r in rows if r["prompt_tag"] == tag][:n]


def test_the_readme_example_runs_and_ptcli_infer_gives_the_same_rows(
    lively_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "myproj"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", 4, "-q"))
    write_jsonl(root / "train.jsonl", _rows("reviews", "train", 24))
    write_jsonl(root / "valid.jsonl", _rows("reviews", "valid", 6))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), namespace)
    result, rows = namespace["result"], namespace["rows"]
    assert [r["prediction"] in ("positive", "negative") for r in result.rows] == [True] * len(rows)
    ran = cli("infer", write_jsonl(tmp_path / "rows.jsonl", rows), "-p", root, "--mode", "rank", "-q")
    ok(ran)
    assert [json.loads(line) for line in ran.stdout.splitlines()] == result.rows
    project = Project.open(root)
    assert project.tags() == ["reviews"] and project.record("reviews").steps == 20
    assert project.prompt("reviews").shape[0] == 4  # (P, H)
    with pytest.raises(InputError) as bad:
        project.infer([{"prompt_tag": "reviews"}])
    assert bad.value.problems == ["row 1: missing field 'text'"]
    with pytest.raises(ProjectError, match="unknown tag 'nope'; known tags: reviews"):
        project.record("nope")
    light = f"import sys; from ptcli.api import Project; p = Project.open({str(root)!r}); p.tags(); p.record('reviews')"
    subprocess.run(
        [sys.executable, "-c", light + "; assert 'torch' not in sys.modules"], check=True
    )  # bank reads: no torch
