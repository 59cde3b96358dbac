"""Bank management, PEFT interop, `show`, light commands: the CLI end to end, in process.

One project is initialised and tuned once per module; tests that change a project copy it first.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from clihelp import cli, failed, ok

from ptcli.cli.app import app
from ptcli.project import bank
from ptcli.project import manifest as proj

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # third-party chatter from PEFT and transformers when PEFT wraps the base
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning"),
]

P = 4
STEPS = 4
FAST = [
    "--warmup-steps",
    "1",
    "--max-steps",
    str(STEPS),
    "--val-check-interval",
    "2",
    "--batch-size",
    "4",
    "--max-seq-length",
    "64",
]
ROWS = [
    ("i love it", "positive"),
    ("i hate it", "negative"),
    ("i really like the movie", "positive"),
    ("i dislike the food", "negative"),
    ("i adore this", "positive"),
    ("i loathe the phone", "negative"),
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> SimpleNamespace:
    """A project on lively_llama with `sent` tuned for a few steps (validations at 0, 2, 4)."""
    d = tmp_path_factory.mktemp("ux")
    rows = [{"prompt_tag": "sent", "text": t, "answer": a} for t, a in ROWS]
    train, valid = _jsonl(d / "train.jsonl", rows[:4]), _jsonl(d / "valid.jsonl", rows[4:])
    root = d / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", P, "-q"))
    ok(cli("tune", "--tag", "sent", "--train", train, "--valid", valid, *FAST, "-p", root, "-q"))
    return SimpleNamespace(root=root, train=train, valid=valid, base=lively_llama)


@pytest.fixture
def root(tuned, tmp_path: Path) -> Path:
    """A fresh copy of the tuned project."""
    return Path(shutil.copytree(tuned.root, tmp_path / "copy"))


def _other_project(tmp_path: Path, base: Path, n: int = P) -> Path:
    root = tmp_path / f"other-{base.name}-{n}"
    ok(cli("init", root, "--base", base, "--num-prompt-tokens", n, "-q"))
    return root


def _bank_file(root: Path, tag: str) -> Path:
    return root / "bank" / f"{tag}.safetensors"


# ---------------------------------------------------------------- help


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("show", ["--plot", "--json", "--project", "-p"]),
        ("remove-tag", ["--keep-task", "--json", "--project", "-p"]),
        ("rename-tag", ["--json", "--project", "-p"]),
        ("export", ["--format", "--force", "--json", "--project", "-p"]),
        ("import", ["--tag", "--format", "--json", "--project", "-p"]),
    ],
)
def test_new_commands_have_help_and_flags(command: str, flags: list[str]) -> None:
    result = cli(command, "--help")
    ok(result)
    assert [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", result.stdout)] == []
    assert re.search(rf"^\W*{command}\s", cli("--help").stdout, re.M)


@pytest.mark.parametrize(
    "args", [["remove-tag", "../runs"], ["show", "../ptcli"], ["export", "../x", "out"], ["rename-tag", "../sent", "x"]]
)
def test_tags_cannot_reach_outside_the_bank(root: Path, args: list[str]) -> None:
    before = sorted(str(p) for p in root.rglob("*"))
    assert "is not a valid tag" in failed(cli(*args, "-p", root), 2)
    assert sorted(str(p) for p in root.rglob("*")) == before


# ---------------------------------------------------------------- show


def test_show_renders_record_and_curves_on_stderr(tuned) -> None:
    result = cli("show", "sent", "-p", tuned.root)
    ok(result)
    assert result.stdout == ""  # tables are for people
    err = result.stderr
    assert "prompt sent" in err and f"{P} tokens x 32" in err and "(best at step" in err
    assert "(initial -> best)" in err and "sha256" in err and " ok" in err
    assert "curves (" in err and "metrics.jsonl" in err
    assert f"steps 1-{STEPS}" in err and f"steps 0-{STEPS}" in err
    assert any(ch in err for ch in "▁▂▃▄▅▆▇█")


def test_show_json(tuned) -> None:
    result = cli("show", "sent", "-p", tuned.root, "--json")
    ok(result)
    doc = json.loads(result.stdout)
    _, meta = bank.get(proj.load(tuned.root), "sent")
    assert doc["tag"] == "sent" and doc["checksum_ok"] is True and doc["record"] == meta.to_json()
    assert [r["step"] for r in doc["curves"]["train"]] == list(range(1, STEPS + 1))
    assert [r["step"] for r in doc["curves"]["valid"]] == [0, 2, 4]
    assert doc["curves"]["valid"][0] == {"step": 0, **meta.initial_metrics}
    assert set(doc["curves"]["train"][0]) == {"step", "loss", "lr"}


def test_show_plot_writes_a_png(tuned, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = cli("show", "sent", "-p", tuned.root, "--plot", out)
    ok(result)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert f"wrote {out}" in result.stderr


def test_show_flags_a_damaged_prompt(root: Path) -> None:
    path = _bank_file(root, "sent")
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    result = cli("show", "sent", "-p", root, "--json")
    ok(result)
    assert json.loads(result.stdout)["checksum_ok"] is False
    assert "MISMATCH" in cli("show", "sent", "-p", root).stderr


def test_show_unknown_tag(tuned) -> None:
    err = failed(cli("show", "nope", "-p", tuned.root), 1)
    assert "unknown tag 'nope'; known tags: sent" in err


def test_show_without_curves(root: Path, tmp_path: Path) -> None:
    shutil.rmtree(root / "runs" / "sent")
    result = cli("show", "sent", "-p", root)
    ok(result)
    assert "no curves:" in result.stderr
    err = failed(cli("show", "sent", "-p", root, "--plot", tmp_path / "x.png"), 1)
    assert "no curves to plot for 'sent'" in err
    assert not (tmp_path / "x.png").exists()


def test_sparkline() -> None:
    from ptcli.project.report import sparkline

    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([3.0, 3.0]) == "▄▄"
    assert sparkline([]) == "" and sparkline([float("nan")]) == ""
    assert len(sparkline(list(range(1000)), width=40)) == 40


# ---------------------------------------------------------------- remove-tag and rename-tag


def test_remove_tag(root: Path) -> None:
    result = cli("remove-tag", "sent", "-p", root, "--json")
    ok(result)
    doc = json.loads(result.stdout)
    assert doc == {
        "tag": "sent",
        "removed": [str(_bank_file(root, "sent")), str(root / "runs" / "sent")],
        "task_record": True,
    }
    assert "removed 'sent'" in result.stderr
    assert not _bank_file(root, "sent").exists() and not (root / "runs" / "sent").exists()
    assert proj.load(root).tasks == {}
    assert json.loads(cli("list-tags", "-p", root, "--json").stdout) == []
    err = failed(cli("remove-tag", "sent", "-p", root), 1)
    assert "unknown tag 'sent'; known tags: none yet" in err


def test_remove_tag_keep_task(root: Path) -> None:
    ok(cli("remove-tag", "sent", "-p", root, "--keep-task", "-q"))
    assert not _bank_file(root, "sent").exists() and "sent" in proj.load(root).tasks


def test_writers_take_the_project_lock(root: Path, tmp_path: Path) -> None:
    from ptcli.project.storage import project_lock

    exported = tmp_path / "sent.safetensors"
    ok(cli("export", "sent", exported, "-p", root))
    before = {p.name: p.read_bytes() for p in (root / "bank").iterdir()}
    with project_lock(root, "ptcli tune --tag other"):
        for args in (["remove-tag", "sent"], ["rename-tag", "sent", "s2"], ["import", exported, "--tag", "s3"]):
            err = failed(cli(*args, "-p", root), 1)
            assert f"project {root} is locked by pid" in err, args
    assert {p.name: p.read_bytes() for p in (root / "bank").iterdir()} == before


def test_rename_tag(root: Path) -> None:
    before, _ = bank.get(proj.load(root), "sent")
    old_sha = json.loads(cli("show", "sent", "-p", root, "--json").stdout)["record"]["sha256"]
    result = cli("rename-tag", "sent", "pos-neg", "-p", root, "--json")
    ok(result)
    assert json.loads(result.stdout) == {
        "old": "sent",
        "new": "pos-neg",
        "path": str(_bank_file(root, "pos-neg")),
        "moved": ["task record", str(root / "runs" / "pos-neg")],
    }
    assert not _bank_file(root, "sent").exists() and not (root / "runs" / "sent").exists()
    p = proj.load(root)
    after, meta = bank.get(p, "pos-neg")  # loads through safetensors: the rewritten header is valid
    assert torch.equal(after, before)
    assert meta.tag == "pos-neg" and meta.sha256 == old_sha
    assert set(p.tasks) == {"pos-neg"}
    shown = json.loads(cli("show", "pos-neg", "-p", root, "--json").stdout)
    assert shown["checksum_ok"] and len(shown["curves"]["train"]) == STEPS


def test_rename_tag_refusals(root: Path) -> None:
    ok(cli("rename-tag", "sent", "other", "-p", root, "-q"))
    ok(cli("import", _export(root, "other", root.parent), "--tag", "sent", "-p", root, "-q"))
    before = {p.name: p.read_bytes() for p in (root / "bank").iterdir()}
    err = failed(cli("rename-tag", "sent", "other", "-p", root), 1)
    assert "tag 'other' already exists" in err and "ptcli remove-tag other" in err
    assert "'bad/name' is not a valid tag" in failed(cli("rename-tag", "sent", "bad/name", "-p", root), 2)
    assert "the new tag is the old one" in failed(cli("rename-tag", "sent", "sent", "-p", root), 2)
    assert "unknown tag 'nope'" in failed(cli("rename-tag", "nope", "x", "-p", root), 1)
    assert {p.name: p.read_bytes() for p in (root / "bank").iterdir()} == before


# ---------------------------------------------------------------- export and import (ptcli format)


def _export(root: Path, tag: str, where: Path) -> Path:
    out = where / f"{tag}-export.safetensors"
    ok(cli("export", tag, out, "-p", root, "-q"))
    return out


def test_export_is_the_bank_file_as_is(tuned, tmp_path: Path) -> None:
    out = tmp_path / "sent.safetensors"
    result = cli("export", "sent", out, "-p", tuned.root, "--json")
    ok(result)
    assert json.loads(result.stdout) == {"tag": "sent", "format": "ptcli", "path": str(out), "files": [str(out)]}
    assert out.read_bytes() == _bank_file(tuned.root, "sent").read_bytes()
    (tmp_path / "dir").mkdir()
    ok(cli("export", "sent", tmp_path / "dir", "-p", tuned.root, "-q"))  # a folder gets TAG.safetensors
    assert (tmp_path / "dir" / "sent.safetensors").read_bytes() == out.read_bytes()
    err = failed(cli("export", "sent", out, "-p", tuned.root), 2)
    assert "already exists" in err and "--force" in err
    ok(cli("export", "sent", out, "-p", tuned.root, "--force", "-q"))
    piped = cli("export", "sent", "-", "-p", tuned.root)
    ok(piped)
    assert piped.stdout_bytes == out.read_bytes()
    assert "unknown tag 'nope'" in failed(cli("export", "nope", tmp_path / "n.safetensors", "-p", tuned.root), 1)


def test_import_under_a_new_tag(root: Path, tmp_path: Path) -> None:
    exported = _export(root, "sent", tmp_path)
    err = failed(cli("import", exported, "-p", root), 1)
    assert "tag 'sent' is already in the bank" in err and "--tag" in err
    result = cli("import", exported, "--tag", "copy", "-p", root, "--json")
    ok(result)
    assert json.loads(result.stdout) == {
        "tag": "copy",
        "format": "ptcli",
        "source": str(exported),
        "path": str(_bank_file(root, "copy")),
        "warnings": [],
    }
    p = proj.load(root)
    (a, meta_a), (b, meta_b) = bank.get(p, "sent"), bank.get(p, "copy")
    assert torch.equal(a, b) and meta_b.tag == "copy"
    assert dataclasses.replace(meta_a, tag=None) == dataclasses.replace(meta_b, tag=None)
    ok(cli("import", "-", "--tag", "from-stdin", "-p", root, "-q", input=exported.read_bytes()))
    assert torch.equal(bank.get(proj.load(root), "from-stdin")[0], a)


def test_import_refuses_a_damaged_file(root: Path, tmp_path: Path) -> None:
    blob = bytearray(_export(root, "sent", tmp_path).read_bytes())
    blob[-3] ^= 0x01
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(blob))
    err = failed(cli("import", bad, "--tag", "x", "-p", root), 1)
    assert f"{bad} is corrupted: its checksum does not match" in err
    (tmp_path / "junk.safetensors").write_bytes(b"not a prompt at all")
    assert "not a safetensors file" in failed(cli("import", tmp_path / "junk.safetensors", "--tag", "x", "-p", root), 1)
    assert "does not exist" in failed(cli("import", tmp_path / "missing.safetensors", "-p", root), 2)
    assert not _bank_file(root, "x").exists()


def test_import_refuses_another_base_naming_both(tuned, tiny_llama: Path, tmp_path: Path) -> None:
    exported = _export(tuned.root, "sent", tmp_path)
    other = _other_project(tmp_path, tiny_llama)
    err = failed(cli("import", exported, "-p", other), 1)
    assert (
        f"was tuned on base {str(tuned.base.resolve())!r}" in err
        and f"this project's base is {str(tiny_llama.resolve())!r}" in err
    )
    longer = _other_project(tmp_path, tuned.base, P + 1)
    assert f"has {P} prompt tokens; this project uses {P + 1}" in failed(cli("import", exported, "-p", longer), 1)
    assert bank.tags(proj.load(other)) == [] and bank.tags(proj.load(longer)) == []


# ---------------------------------------------------------------- PEFT


def _peft_export(root: Path, tag: str, out: Path) -> Path:
    result = cli("export", tag, out, "--format", "peft", "-p", root, "--json")
    ok(result)
    assert json.loads(result.stdout)["files"] == [
        str(out / "adapter_config.json"),
        str(out / "adapter_model.safetensors"),
        str(out / "README.md"),  # the model card (tests/test_card.py)
    ]
    return out


def test_peft_loads_the_exported_adapter_and_agrees_with_ptcli(tuned, tmp_path: Path) -> None:
    import warnings

    from peft import PeftConfig, PeftModel, PromptTuningConfig
    from reference import assemble, greedy

    from ptcli.lm.base import load_base
    from ptcli.lm.forward import to_logits

    out = _peft_export(tuned.root, "sent", tmp_path / "adapter")
    prompt, _ = bank.get(proj.load(tuned.root), "sent")  # (P, H)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword arguments": the config is PEFT's own schema
        config = PeftConfig.from_pretrained(str(out))
    assert config.peft_type == "PROMPT_TUNING" and config.task_type == "CAUSAL_LM"
    assert (config.num_virtual_tokens, config.token_dim, config.num_transformer_submodules) == (P, 32, 1)
    assert (config.num_layers, config.num_attention_heads) == (2, 4)
    written = set(json.loads((out / "adapter_config.json").read_text()))
    assert written == set(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P).to_dict()) - {"peft_version"}

    model, tok = load_base(str(tuned.base))
    base, _ = load_base(str(tuned.base))
    peft_model = PeftModel.from_pretrained(base, str(out))
    assert torch.equal(peft_model.get_prompt_embedding_to_save("default"), prompt)

    ids = tok("i really like the movie", add_special_tokens=False).input_ids  # one unpadded row
    with torch.inference_mode():
        embeds, mask, pos = assemble(model, prompt, [ids], tok.pad_token_id)  # (1, P+T, H)
        ours = to_logits(
            model,
            model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1],
        )  # (1, V)
        x = torch.tensor([ids])
        theirs = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1]  # (1, V)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)

    ours_greedy = greedy(model, prompt, [ids], tok.pad_token_id, tok.eos_token_id, 6)[0]
    # use_cache=False: with transformers 5, PEFT 0.21's cached generate re-inserts the virtual tokens at every
    # decoding step (its prepare_inputs_for_generation looks for `past_key_values`), so it disagrees with its own
    # forward.
    with torch.inference_mode():
        gen = peft_model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=6,
            do_sample=False,
            use_cache=False,
            pad_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )[0].tolist()
    new = gen[len(ids) :] if gen[: len(ids)] == ids else gen  # PEFT returns the input ids first
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert new == ours_greedy and len(ours_greedy) > 0


def test_peft_round_trip_gives_the_same_prompt_and_record(root: Path, tmp_path: Path) -> None:
    out = _peft_export(root, "sent", tmp_path / "adapter")
    err = failed(cli("import", out, "-p", root), 1)  # a ptcli-made adapter remembers its tag
    assert "tag 'sent' is already in the bank" in err
    result = cli("import", out, "--tag", "back", "-p", root, "--json")  # a folder: --format peft is implied
    ok(result)
    assert json.loads(result.stdout)["format"] == "peft"
    p = proj.load(root)
    (a, meta_a), (b, meta_b) = bank.get(p, "sent"), bank.get(p, "back")
    assert torch.equal(a, b)
    assert dataclasses.replace(meta_a, tag=None) == dataclasses.replace(meta_b, tag=None)
    assert _bank_file(root, "back").read_bytes() == bank.relabel("x", _bank_file(root, "sent").read_bytes(), "back")


def _foreign_adapter(base: Path, out: Path, n: int = P) -> torch.Tensor:
    """An adapter made by PEFT itself (no ptcli record), with recognisable weights."""
    from peft import PromptTuningConfig, get_peft_model

    from ptcli.lm.base import load_base

    model, _ = load_base(str(base))
    pm = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(
            torch.arange(n * 32, dtype=torch.float32).reshape(n, 32) / 100
        )
    pm.save_pretrained(str(out))
    return pm.get_prompt_embedding_to_save("default")


def test_import_a_peft_made_adapter(root: Path, tuned, tmp_path: Path) -> None:
    out = tmp_path / "foreign"
    weights = _foreign_adapter(tuned.base, out)
    assert "--tag is required" in failed(cli("import", out, "-p", root), 2)
    result = cli("import", out, "--format", "peft", "--tag", "foreign", "-p", root, "--json")
    ok(result)
    prompt, meta = bank.get(proj.load(root), "foreign")
    assert torch.equal(prompt, weights)
    assert meta.init == "peft" and meta.imported_from["path"] == str(out.resolve())
    assert meta.config["max_seq_length"] > P
    ok(cli("show", "foreign", "-p", root))
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    result = cli("import", out, "--tag", "named-other", "-p", root)
    ok(result)
    assert "warning: the adapter names base 'org/other'" in result.stderr and result.stdout == ""
    infer = cli(
        "infer", "-", "-p", root, "--tokens-to-generate", "2", input='{"prompt_tag": "foreign", "text": "i love it"}\n'
    )
    ok(infer)
    assert "prediction" in json.loads(infer.stdout)


def test_peft_import_refusals(root: Path, tuned, tmp_path: Path) -> None:
    good = tmp_path / "good"
    _foreign_adapter(tuned.base, good)
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name: str, **changes) -> Path:
        d = Path(shutil.copytree(good, tmp_path / name))
        (d / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return d

    err = failed(cli("import", variant("lora", peft_type="LORA"), "--tag", "x", "-p", root), 2)
    assert "peft_type is 'LORA'; ptcli imports PROMPT_TUNING adapters only" in err
    err = failed(cli("import", variant("longer", num_virtual_tokens=P + 2), "--tag", "x", "-p", root), 1)
    assert f"has {P + 2} virtual tokens; this project uses {P}" in err
    err = failed(
        cli("import", variant("wider", token_dim=64, base_model_name_or_path="org/big"), "--tag", "x", "-p", root), 1
    )
    assert (
        "was made for base 'org/big' (token_dim 64)" in err
        and f"this project's base is {str(tuned.base.resolve())!r} (hidden size 32)" in err
    )
    pickled = variant("pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    err = failed(cli("import", pickled, "--tag", "x", "-p", root), 2)
    assert "adapter_model.bin, a pickle; ptcli never loads pickles" in err
    assert "is a file" in failed(
        cli("import", good / "adapter_config.json", "--format", "peft", "--tag", "x", "-p", root), 2
    )
    assert bank.tags(proj.load(root)) == ["sent"]


def test_peft_export_refuses_to_overwrite(tuned, tmp_path: Path) -> None:
    out = _peft_export(tuned.root, "sent", tmp_path / "adapter")
    err = failed(cli("export", "sent", out, "--format", "peft", "-p", tuned.root), 2)
    assert "already holds an adapter" in err and "--force" in err
    ok(cli("export", "sent", out, "--format", "peft", "--force", "-p", tuned.root, "-q"))
    assert "takes the ptcli format" in failed(cli("export", "sent", "-", "--format", "peft", "-p", tuned.root), 2)


# ---------------------------------------------------------------- light commands


def test_light_commands_import_neither_torch_nor_transformers(root: Path, tmp_path: Path) -> None:
    """`--help`, list-tags, show, rename/remove, export/import of ptcli files and completion stay fast."""
    code = textwrap.dedent(f"""
        import json, sys
        from typer.testing import CliRunner
        from ptcli.cli.app import app
        root, out = {str(root)!r}, {str(tmp_path / "x.safetensors")!r}
        runs = [["--help"], ["list-tags", "-p", root], ["list-tags", "-p", root, "--json"],
                ["show", "sent", "-p", root], ["show", "sent", "-p", root, "--json"],
                ["export", "sent", out, "-p", root], ["rename-tag", "sent", "s2", "-p", root],
                ["import", out, "-p", root], ["remove-tag", "s2", "-p", root]]
        codes = [CliRunner().invoke(app, a).exit_code for a in runs]
        env = {{"_PTCLI_COMPLETE": "complete_bash", "COMP_WORDS": "ptcli show -p " + root + " ", "COMP_CWORD": "4"}}
        completed = CliRunner().invoke(app, [], env=env).stdout.split()
        heavy = sorted(m for m in ("torch", "transformers", "matplotlib", "peft", "accelerate") if m in sys.modules)
        print(json.dumps({{"codes": codes, "heavy": heavy, "completed": completed}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert doc == {"codes": [0] * 9, "heavy": [], "completed": ["sent"]}


def test_docs_command_table_matches_the_app() -> None:
    """Every command is in the table of docs/commands.md, and every flag the table shows exists."""
    import typer

    page = Path(__file__).resolve().parents[1] / "docs" / "commands.md"
    rows = re.findall(r"^\| `ptcli ([a-z-]+)([^`]*)` \|", page.read_text(encoding="utf-8"), re.M)
    assert rows, f"{page} has no commands table (rows starting | `ptcli COMMAND ...` |)"
    commands = set(typer.main.get_command(app).commands)
    assert {name for name, _ in rows} == commands
    for name, usage in rows:
        help_text = cli(name, "--help").stdout
        missing = [f for f in re.findall(r"--[a-z-]+", usage) if not re.search(rf"(?<![\w-]){f}(?![\w-])", help_text)]
        assert not missing, (name, missing)
