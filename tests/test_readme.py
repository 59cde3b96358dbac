"""The README's five-minute tour runs as written, on a tiny model instead of the default one.

And the README stays a front page: small, linking every page of docs/ and only pages that exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 12_000


def tour_commands() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n## A five-minute tour\n" in text, "README.md has no '## A five-minute tour' section"
    section = text.split("\n## A five-minute tour\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the tour has no bash block"
    return block.group(1)


def test_readme_is_a_small_front_page_linking_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) < README_MAX_BYTES, f"README.md is {len(readme)} bytes; move reference text to docs/*.md"
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#[^)]*)?\)", readme.decode("utf-8")))
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert not linked - pages, f"README.md links docs pages that do not exist: {sorted(linked - pages)}"
    assert not pages - linked, f"docs pages that README.md does not link: {sorted(pages - linked)}"


def _write(path: Path, tag: str, split: str, n: int) -> None:
    rows = [
        r
        for r in map(json.loads, (ROOT / "examples" / "data" / f"{split}.jsonl").read_text().splitlines())
        if r["prompt_tag"] == tag
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))


@pytest.mark.slow  # a dozen ptcli subprocesses
@pytest.mark.skipif(shutil.which("jq") is None, reason="the tour pipes into jq")
def test_the_readme_tour_runs(tiny_llama, tmp_path):
    script = tour_commands()
    assert "ptcli init myproj" in script
    script = script.replace("ptcli init myproj", f"ptcli init myproj --base {tiny_llama}", 1)  # the one substitution
    proj = tmp_path / "myproj"
    proj.mkdir()
    _write(proj / "train.jsonl", "reviews", "train", 32)
    _write(proj / "valid.jsonl", "reviews", "valid", 8)
    _write(proj / "topic-train.jsonl", "topic", "train", 32)
    _write(proj / "topic-valid.jsonl", "topic", "valid", 8)
    (proj / "mixed.jsonl").write_text(
        "".join((ROOT / "examples" / "data" / "test.jsonl").read_text().splitlines(keepends=True)[:12])
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    split = lines.index("{")  # `jq -r .prediction` lines, then the `jq .accuracy` document
    assert split == 12  # one prediction per line of mixed.jsonl
    accuracy = json.loads("\n".join(lines[split:]))
    assert set(accuracy) == {"reviews", "topic"}
    assert (proj / "reviews.png").stat().st_size > 1000
    assert sorted(p.name for p in (proj / "bank").iterdir()) == ["reviews.safetensors", "topic.safetensors"]


def _documented_invocations() -> list[tuple[str, list[str]]]:
    """(page, words) of every `ptcli ...` call in a bash block of README.md and docs/*.md, flags and all."""
    import shlex

    calls = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            pending = ""
            for line in block.replace("\\\n", " ").splitlines():
                pending += line + " "
                try:  # a quoted argument may span lines: read on until the quotes close
                    tokens = list(shlex.shlex(pending, posix=True, punctuation_chars=True))  # | ; && are tokens
                except ValueError:
                    continue
                pending, words = "", []
                for w in [*tokens, "|"]:
                    if w and set(w) <= set("|&;<>()"):
                        words = [x for x in words if not re.fullmatch(r"[A-Z_]+=\S*", x)]  # VAR=value prefixes
                        at = [i for i, x in enumerate(words) if x == "ptcli" and (i == 0 or words[i - 1] == "-m")]
                        if words[:1] == ["ssh"] and "ptcli" in words:  # `ssh host ptcli ...`
                            at = [words.index("ptcli")]
                        calls += [(page.name, words[i + 1 :]) for i in at[:1]]
                        words = []
                    else:
                        words.append(w)
    return calls


def test_every_documented_call_names_a_command_and_its_flags() -> None:
    """Each `ptcli CMD --flag` in the docs is a command of the app and flags it has (checked in process)."""
    import typer

    from ptcli.cli.app import app
    from ptcli.data.template import parse
    from ptcli.errors import UsageError

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    calls = _documented_invocations()
    assert len(calls) >= 25, "the docs' ptcli calls were not found"
    wrong = []
    for page, words in calls:
        if not words or words[0] not in commands:
            wrong.append(f"{page}: ptcli {' '.join(words)}: no such command")
            continue
        known = {o for p in commands[words[0]].params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        flags = [w.split("=", 1)[0] for w in words[1:] if w.startswith("-") and w != "-"]  # '-' is stdin/stdout
        wrong += [f"{page}: ptcli {words[0]}: no flag {f}" for f in flags if f not in known]
        for i in (i for i, w in enumerate(words[:-1]) if w == "--template"):
            try:
                parse(words[i + 1], 20)  # a documented template parses (for a project of 20 prompt vectors)
            except UsageError as e:
                wrong.append(f"{page}: {e.message}")
    assert not wrong, "\n".join(wrong)
