"""Model cards: `ptcli export` into a folder writes a README.md in the Hub's format, generated from the record."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from clihelp import cli, failed, ok, write_jsonl

from ptcli.project import bank
from ptcli.project import manifest as proj
from ptcli.project.card import DEFAULT_HUB_ID, hub_id

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = [("i love it", "positive"), ("i hate it", "negative"), ("i adore this", "positive"), ("i loathe it", "negative")]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> Path:
    d = tmp_path_factory.mktemp("card")
    root = d / "p"
    data = write_jsonl(d / "a.jsonl", [{"prompt_tag": "a", "text": t, "answer": x} for t, x in ROWS])
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", 4, "-q"))
    flags = ["--max-steps", 4, "--val-check-interval", 2, "--batch-size", 2, "--max-seq-length", 64]
    ok(
        cli(
            "tune",
            "--tag",
            "a",
            "--train",
            data,
            "--valid",
            data,
            *flags,
            "--init-text",
            "good or bad",
            "-p",
            root,
            "-q",
        )
    )
    return root


def _front(readme: Path) -> tuple[dict, str]:
    text = readme.read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.mark.parametrize("fmt", ["ptcli", "peft"])
def test_the_card_is_the_record_in_the_hubs_format(project: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    if fmt == "ptcli":
        out.mkdir()  # a folder gets TAG.safetensors and the card; a file path, the file alone
    ok(cli("export", "a", out, "--format", fmt, "-p", project, "-q"))
    meta, body = _front(out / "README.md")
    record = bank.read_meta(proj.load(project), "a").record
    assert "base_model" not in meta  # a local folder is no Hub id
    assert meta["library_name"] == fmt and meta["pipeline_tag"] == "text-generation"
    assert "prompt-tuning" in meta["tags"] and ("peft" in meta["tags"]) == (fmt == "peft")
    result = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == "a" and result["dataset"]["name"] == record.config["valid"]
    assert {m["type"]: m["value"] for m in result["metrics"]} == {k: round(v, 4) for k, v in record.metrics.items()}
    assert f"{record.num_prompt_tokens} prompt vectors" in body and "| template | `prefix` |" in body
    assert "| init | text ('good or bad') |" in body and f"kept: step {record.best_step}" in body
    assert ("PeftModel.from_pretrained" in body) == (fmt == "peft")
    where = out if fmt == "peft" else out / "a.safetensors"
    assert f"ptcli import {where} -p proj" in body
    again = tmp_path / "again"  # the command the card gives works
    ok(cli("init", again, "--base", proj.load(project).base.ref, "--num-prompt-tokens", 4, "-q"))
    ok(cli("import", where, "-p", again, "-q"))


def test_a_folders_own_readme_is_not_overwritten_without_force(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine\n")
    err = failed(cli("export", "a", out, "-p", project, "-q"), 2)
    assert "README.md" in err and (out / "README.md").read_text() == "mine\n" and not (out / "a.safetensors").exists()
    ok(cli("export", "a", out, "-p", project, "--force", "-q"))
    assert _front(out / "README.md")[0]["library_name"] == "ptcli"


def test_a_file_export_writes_no_card(project: Path, tmp_path: Path) -> None:
    ok(cli("export", "a", tmp_path / "a.safetensors", "-p", project, "-q"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_the_base_is_named_by_its_hub_id_when_it_has_one(project: Path) -> None:
    p = proj.load(project)
    assert hub_id(p) is None
    for ref, want in (("default", DEFAULT_HUB_ID), ("org/model", "org/model"), ("./local", None), ("m.gguf", None)):
        p.base.ref = ref
        assert hub_id(p) == want, ref
