"""The command line end to end, in process: help, exit codes, messages, files written, stdout data.

One project is initialised per module and tuned once; tests that change a project copy it first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from clihelp import cli, failed, ok
from typer.testing import CliRunner

from ptcli.cli.app import app
from ptcli.config import TaskConfig
from ptcli.errors import ModelError
from ptcli.lm.base import fingerprint, load_base
from ptcli.project import bank
from ptcli.project import manifest as proj

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P = 4
FAST = [
    "--warmup-steps",
    "1",
    "--max-steps",
    "2",
    "--val-check-interval",
    "2",
    "--batch-size",
    "4",
    "--max-seq-length",
    "64",
]

SENT = [
    ("i love it", "positive"),
    ("i hate it", "negative"),
    ("i really like the movie", "positive"),
    ("i dislike the food", "negative"),
    ("i adore this", "positive"),
    ("i loathe the phone", "negative"),
]
TOPIC = [
    ("the team won the game on saturday night", "sports"),
    ("a new restaurant opened downtown", "food"),
    ("researchers discovered a new planet", "science"),
    ("sports news : the team won", "sports"),
    ("fresh bread", "food"),
    ("science news : this week", "science"),
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("data")
    files = {}
    for tag, pairs in (("sent", SENT), ("topic", TOPIC)):
        rows = [{"prompt_tag": tag, "text": t, "answer": a} for t, a in pairs]
        files[f"{tag}_train"] = _jsonl(d / f"{tag}_train.jsonl", rows[:4])
        files[f"{tag}_valid"] = _jsonl(d / f"{tag}_valid.jsonl", rows[4:])
    return SimpleNamespace(dir=d, **files)


@pytest.fixture(scope="module")
def base_project(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("proj") / "p"
    result = cli("init", root, "--base", lively_llama, "--num-prompt-tokens", P, "--json")
    ok(result)
    return SimpleNamespace(root=root, init_json=json.loads(result.stdout))


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def _tune(root: Path, data: SimpleNamespace, tag: str, *extra) -> None:
    ok(
        cli(
            "tune",
            "--tag",
            tag,
            "--train",
            getattr(data, f"{tag}_train"),
            "--valid",
            getattr(data, f"{tag}_valid"),
            *FAST,
            *extra,
            "-p",
            root,
            "-q",
        )
    )


def _model_files(path: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tuned(base_project, data, lively_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A project with `sent` (text init) and then `topic` (random init, other seed) tuned; a snapshot between."""
    root = Path(shutil.copytree(base_project.root, tmp_path_factory.mktemp("tuned") / "p"))
    weights_before = _model_files(lively_llama)
    _tune(root, data, "sent", "--init", "text", "--seed", "1")
    sent_after_first = (root / "bank" / "sent.safetensors").read_bytes()
    _tune(root, data, "topic", "--init", "random", "--seed", "2")
    return SimpleNamespace(root=root, sent_after_first=sent_after_first, weights_before=weights_before)


# ---------------------------------------------------------------- help


def test_version() -> None:
    result = cli("--version")
    ok(result)
    assert result.stdout == "ptcli 0.1.0\n"


def test_help_lists_commands() -> None:
    result = cli("--help")
    ok(result)
    for command in ("init", "add-task", "tune", "infer", "list-tags"):
        assert re.search(rf"^\W*{command}\s", result.stdout, re.M), command


TASK_FLAGS = [
    "--train",
    "--valid",
    "--init",
    "--init-text",
    "--answer-only",
    "--full-text-loss",
    "--batch-size",
    "--lr",
    "--min-lr",
    "--warmup-steps",
    "--constant-steps",
    "--max-steps",
    "--val-check-interval",
    "--max-seq-length",
    "--seed",
    "--project",
]


def _has_flag(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("init", ["--base", "--num-prompt-tokens", "--json"]),
        ("add-task", TASK_FLAGS),
        ("tune", ["--tag", "--num-prompt-tokens", "--resume", "--overwrite", "--json", *TASK_FLAGS]),
        ("infer", ["--tokens-to-generate", "--batch-size", "--project", "--json"]),
        ("list-tags", ["--project", "--json"]),
    ],
)
def test_command_help(command: str, flags: list[str]) -> None:
    result = cli(command, "--help")
    ok(result)
    missing = [f for f in flags if not _has_flag(result.stdout, f)]
    assert not missing


@pytest.mark.parametrize("command", ["add-task", "tune"])
def test_help_shows_every_setting_default_and_that_a_recorded_value_wins(command: str) -> None:
    result = cli(command, "--help")
    ok(result)
    text = re.sub(r"(?<=\w-) ", "", " ".join(result.stdout.split()))  # help wraps lines, also after a hyphen
    assert "takes the value recorded for the task (by add-task or an earlier tune)" in text
    shown = {"train": "[required unless recorded]", "valid": "[required unless recorded]"}
    shown |= {"init_text": "[default: the task's answers]", "max_minutes": "[default: no limit]"}
    shown |= {"answer_only": "[default: --answer-only]", "group_by_length": "[default: --group-by-length]"}
    shown |= {"deep": "[default: --no-deep]", "log_with": "[default: none]"}
    shown |= {"log_dir": "[default: the project's runs/trackers]"}
    for f in dataclasses.fields(TaskConfig):
        expected = shown.get(f.name, f"[default: {f.default}]")
        assert f"{f.metadata['help']} {expected}" in text, f.name
    assert "--init [text|labels|vocab|random]" in text or "--init <text|labels|vocab|random>" in text


def test_tune_help_fits_80_columns() -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["tune", "--help"])
    ok(result)
    assert all(
        _has_flag(result.stdout, f) for f in ["--val-check-interval", "--num-prompt-tokens", "--trust-remote-code"]
    )


# ---------------------------------------------------------------- init and project discovery


def test_init_records_the_base(base_project, lively_llama: Path) -> None:
    manifest = json.loads((base_project.root / "ptcli.json").read_text())
    model, _ = load_base(str(lively_llama))
    assert manifest["base"]["fingerprint"] == fingerprint(model)
    assert manifest["base"]["ref"] == str(lively_llama.resolve())
    assert manifest["base"]["hidden_size"] == model.get_input_embeddings().weight.shape[1]
    assert manifest["num_prompt_tokens"] == P and manifest["tasks"] == {}
    assert (base_project.root / "bank").is_dir()
    assert base_project.init_json == {
        "project": str(base_project.root),
        "base": manifest["base"],
        "num_prompt_tokens": P,
    }


def test_second_init_fails(base_project, lively_llama: Path) -> None:
    before = (base_project.root / "ptcli.json").read_bytes()
    err = failed(cli("init", base_project.root, "--base", lively_llama, "--num-prompt-tokens", 8), 1)
    assert f"{base_project.root} is already a ptcli project" in err
    assert (base_project.root / "ptcli.json").read_bytes() == before


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make loading any base fail and record which refs init asked for: a refusal must come first."""
    import ptcli.lm.base

    asked: list[str] = []

    def load_base(ref: str, *_a, **_k):
        asked.append(ref)
        raise ModelError(f"load_base({ref!r}) called")

    monkeypatch.setattr(ptcli.lm.base, "load_base", load_base)
    return asked


@pytest.mark.parametrize(
    ("base", "says"),
    [
        ("/nonexistent/dir", "no such directory: /nonexistent/dir"),
        ("./missing", "no such directory: {tmp}/work/missing"),
        ("../missing", "no such directory: {tmp}/missing"),
        ("~/missing", "no such directory: {home}/missing"),
        ("models/a/b", "no such directory: {tmp}/work/models/a/b"),  # two slashes: no hub id
        ("model.gguf", "no such file: {tmp}/work/model.gguf"),
        ("{tmp}/gone.gguf", "no such file: {tmp}/gone.gguf"),
    ],
)
def test_init_with_a_missing_base_says_so_and_creates_nothing(
    base: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_loads: list[str]
) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    base = base.format(tmp=tmp_path)
    err = failed(cli("init", "p", "--base", base), 2)
    assert f"error: --base {base}: {says.format(home=home, tmp=tmp_path)}" in err
    assert "hint: pass a local Hugging Face folder (with config.json), a .gguf file, or a hub id" in err
    assert "Repo id" not in err and no_model_loads == []
    assert list(work.iterdir()) == [] and list(home.iterdir()) == []


def test_init_on_a_folder_that_is_no_model_says_so(tmp_path: Path, no_model_loads: list[str]) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no model here")
    err = failed(cli("init", tmp_path / "p", "--base", tmp_path / "notes"), 2)
    assert f"--base {tmp_path / 'notes'}: {tmp_path / 'notes'} is not a Hugging Face model folder" in err
    assert "it has no config.json (and no .gguf file)" in err
    (tmp_path / "weights.bin").write_bytes(b"\0")
    err = failed(cli("init", tmp_path / "p", "--base", tmp_path / "weights.bin"), 2)
    assert "is a file but not a .gguf" in err
    assert not (tmp_path / "p").exists() and no_model_loads == []


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M", "gpt2"])
def test_init_passes_a_hub_id_to_the_loader(hub_id: str, tmp_path: Path, no_model_loads: list[str]) -> None:
    err = failed(cli("init", tmp_path / "p", "--base", hub_id), 1)
    assert f"load_base({hub_id!r}) called" in err and no_model_loads == [hub_id]
    assert not (tmp_path / "p").exists()


def test_a_recorded_base_gone_since_init_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"cannot load base model '{tmp_path / 'gone'}': no such directory"):
        load_base(str(tmp_path / "gone"))


def test_manifest_from_a_newer_ptcli_is_refused(base_project, tmp_path: Path) -> None:
    root = _copy(base_project.root, tmp_path)
    manifest = json.loads((root / "ptcli.json").read_text())
    (root / "ptcli.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    err = failed(cli("list-tags", "-p", root), 1)
    assert "has schema version 2; this ptcli reads version 1" in err


def test_a_locked_project_refuses_a_second_writer(base_project, data, tmp_path: Path) -> None:
    from ptcli.project.storage import project_lock

    root = _copy(base_project.root, tmp_path)
    with project_lock(root, "ptcli tune --tag other"):
        err = failed(
            cli("tune", "--tag", "sent", "--train", data.sent_train, "--valid", data.sent_valid, *FAST, "-p", root), 1
        )
    assert f"project {root} is locked by pid" in err and "(ptcli tune --tag other)" in err
    assert not (root / "bank" / "sent.safetensors").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["list-tags"],
        ["add-task", "sent", "--train", "t.jsonl", "--valid", "v.jsonl"],
        ["tune", "--tag", "sent"],
        ["infer", "x.jsonl"],
    ],
    ids=lambda a: a[0],
)
def test_commands_outside_a_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    err = failed(cli(*args), 1)
    assert "no ptcli project in" in err and "ptcli init" in err


def test_project_flag_pointing_nowhere(tmp_path: Path) -> None:
    err = failed(cli("list-tags", "-p", tmp_path), 1)
    assert f"no ptcli project at {tmp_path}" in err and f"ptcli init {tmp_path}" in err


def test_project_found_from_a_subdirectory(tuned, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tuned.root / "bank")
    result = cli("list-tags", "--json")
    ok(result)
    assert [e["tag"] for e in json.loads(result.stdout)] == ["sent", "topic"]


# ---------------------------------------------------------------- add-task and tune


def test_add_task_then_tune_uses_recorded_settings(base_project, data, tmp_path: Path) -> None:
    root = _copy(base_project.root, tmp_path)
    recorded = [
        "--train",
        data.sent_train,
        "--valid",
        data.sent_valid,
        "--init",
        "random",
        "--seed",
        "9",
        "--full-text-loss",
        "--batch-size",
        "3",
        "--lr",
        "0.05",
        "--min-lr",
        "0.001",
        "--warmup-steps",
        "1",
        "--constant-steps",
        "1",
        "--max-steps",
        "3",
        "--val-check-interval",
        "3",
        "--max-seq-length",
        "48",
    ]
    result = cli("add-task", "sent", *recorded, "-p", root, "--json")
    ok(result)
    expected = {
        "train": str(data.sent_train),
        "valid": str(data.sent_valid),
        "init": "random",
        "init_text": None,
        "answer_only": False,
        "batch_size": 3,
        "lr": 0.05,
        "min_lr": 0.001,
        "warmup_steps": 1,
        "constant_steps": 1,
        "max_steps": 3,
        "val_check_interval": 3,
        "max_seq_length": 48,
        "seed": 9,
        "group_by_length": True,
        "ensemble": 1,
        "max_minutes": None,
        "template": "prefix",
        "reparam": "none",
        "reparam_lr": 1e-3,
        "prompt_layer": 0,
        "deep": False,
        "loss": "answer",
        "ema": 0.0,
        "log_with": None,
        "log_dir": None,
    }
    assert json.loads(result.stdout) == {"tag": "sent", "config": expected}
    assert json.loads((root / "ptcli.json").read_text())["tasks"] == {"sent": expected}
    assert not (root / "bank" / "sent.safetensors").exists()

    result = cli("tune", "--tag", "sent", "-p", root, "--json")
    ok(result)
    out = json.loads(result.stdout)
    assert out["steps"] == 3 and out["path"] == str(root / "bank" / "sent.safetensors")
    _, meta = bank.get(proj.load(root), "sent")
    assert meta.config == expected and meta.init == "random" and meta.steps == 3
    history = [json.loads(line) for line in (root / "runs" / "sent" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]


def test_recorded_relative_paths_survive_a_change_of_directory(
    base_project, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(base_project.root, tmp_path)
    monkeypatch.chdir(data.dir)
    ok(cli("add-task", "sent", "--train", data.sent_train.name, "--valid", data.sent_valid.name, *FAST, "-p", root))
    monkeypatch.chdir(root)  # the project is found from here; the data must be too
    ok(cli("tune", "--tag", "sent", "-q"))
    assert (root / "bank" / "sent.safetensors").is_file()


def test_tune_writes_the_bank_and_list_tags_shows_it(tuned) -> None:
    result = cli("list-tags", "-p", tuned.root, "--json")
    ok(result)
    entries = json.loads(result.stdout)
    assert [e["tag"] for e in entries] == ["sent", "topic"]
    assert [e["init"] for e in entries] == ["text", "random"]
    for e in entries:
        assert e["num_prompt_tokens"] == P and e["steps"] == 2
        has_set = bank.read_meta(proj.load(tuned.root), e["tag"]).record.choices is not None
        assert set(e["metrics"]) == {"val_loss", "val_acc"} | ({"val_acc_rank"} if has_set else set())
        assert (tuned.root / "bank" / f"{e['tag']}.safetensors").is_file()
    table = cli("list-tags", "-p", tuned.root)
    ok(table)
    assert table.stdout == "" and "sent" in table.stderr and "topic" in table.stderr  # the table is for people


def test_tuning_another_tag_leaves_the_first_frozen(tuned, lively_llama: Path) -> None:
    assert (tuned.root / "bank" / "sent.safetensors").read_bytes() == tuned.sent_after_first
    assert _model_files(lively_llama) == tuned.weights_before
    p = proj.load(tuned.root)
    assert set(p.tasks) == {"sent", "topic"}
    sent, _ = bank.get(p, "sent")
    topic, _ = bank.get(p, "topic")
    assert not torch.allclose(sent, topic)


def test_retune_needs_overwrite(tuned, data, tmp_path: Path) -> None:
    before = (tuned.root / "bank" / "sent.safetensors").read_bytes()
    err = failed(cli("tune", "--tag", "sent", "-p", tuned.root), 1)
    assert "tag 'sent' already has a prompt in the bank" in err and "--overwrite" in err and "--resume" in err
    assert (tuned.root / "bank" / "sent.safetensors").read_bytes() == before

    root = _copy(tuned.root, tmp_path)
    _tune(root, data, "sent", "--overwrite", "--seed", "5", "--num-prompt-tokens", str(P))
    _, meta = bank.get(proj.load(root), "sent")
    assert meta.config["seed"] == 5
    assert (root / "bank" / "topic.safetensors").read_bytes() == (
        tuned.root / "bank" / "topic.safetensors"
    ).read_bytes()


def test_other_prompt_length_is_a_usage_error(tuned) -> None:
    err = failed(cli("tune", "--tag", "new", "--num-prompt-tokens", P + 1, "-p", tuned.root, *FAST), 2)
    assert f"--num-prompt-tokens {P + 1} differs from the project's {P}" in err
    assert not (tuned.root / "bank" / "new.safetensors").exists()


def test_bad_flag_value_is_a_usage_error(base_project, data) -> None:
    err = failed(
        cli(
            "tune",
            "--tag",
            "sent",
            "--train",
            data.sent_train,
            "--valid",
            data.sent_valid,
            "--batch-size",
            "0",
            "--min-lr",
            "9",
            "-p",
            base_project.root,
        ),
        2,
    )
    assert "--batch-size must be at least 1" in err and "--min-lr must be between" in err


def test_broken_jsonl_exits_2_and_writes_nothing(base_project, data, tmp_path: Path) -> None:
    root = _copy(base_project.root, tmp_path)
    broken = tmp_path / "broken.jsonl"
    lines = data.sent_train.read_text().splitlines()
    broken.write_text(
        "\n".join([lines[0], lines[1], '{"prompt_tag": "sent", "text": "x"', lines[2], '{"prompt_tag": "sent"}']) + "\n"
    )
    err = failed(cli("tune", "--tag", "sent", "--train", broken, "--valid", data.sent_valid, *FAST, "-p", root), 2)
    assert f"{broken}:3: invalid JSON" in err
    assert f"{broken}:5: missing field 'text'" in err
    assert f"{broken}:4:" not in err
    assert not (root / "bank" / "sent.safetensors").exists()
    assert not (root / "runs" / "sent" / "checkpoint.safetensors").exists()

    err = failed(cli("add-task", "sent", "--train", broken, "--valid", data.sent_valid, "-p", root), 2)
    assert f"{broken}:3:" in err
    assert json.loads((root / "ptcli.json").read_text())["tasks"] == {}


@pytest.mark.parametrize("name", ["data[v2].jsonl", "data[/v2].jsonl"])
def test_error_message_shows_paths_verbatim(base_project, tmp_path: Path, name: str) -> None:
    missing = tmp_path / name
    err = failed(cli("add-task", "sent", "--train", missing, "--valid", missing, "-p", base_project.root), 2)
    assert f"data file {missing} does not exist" in err


def test_max_steps_0_stores_the_initial_prompt(base_project, data, lively_llama: Path, tmp_path: Path) -> None:
    root = _copy(base_project.root, tmp_path)
    ok(
        cli(
            "tune",
            "--tag",
            "sent",
            "--train",
            data.sent_train,
            "--valid",
            data.sent_valid,
            "--max-steps",
            "0",
            "-p",
            root,
            "-q",
        )
    )
    prompt, meta = bank.get(proj.load(root), "sent")
    # text init from the task's answers: "negative positive", tokenized, tiled to P
    model, tok = load_base(str(lively_llama))
    ids = tok("negative positive", add_special_tokens=False).input_ids
    expected = model.get_input_embeddings().weight[[ids[i % len(ids)] for i in range(P)]]
    assert torch.equal(prompt, expected)
    assert meta.steps == 0 and meta.best_step == 0 and meta.init_text == "negative positive"


# ---------------------------------------------------------------- infer

TEXTS = ["i love it", "the team won the game on saturday night", "fresh bread and i really like the movie"]


@pytest.fixture(scope="module")
def mixed(data) -> list[dict]:
    rows = []
    for i, text in enumerate(TEXTS):
        rows.append({"prompt_tag": "sent", "text": text, "id": 2 * i})
        rows.append({"prompt_tag": "topic", "text": text, "id": 2 * i + 1, "extra": {"n": [i]}})
    rows[0]["answer"] = "positive"
    rows[3]["answer"] = "sports"
    return rows


def _infer(root: Path, path: Path, *extra) -> list[dict]:
    result = cli("infer", path, "-p", root, "--tokens-to-generate", "4", "-q", *extra)
    ok(result)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_infer_writes_one_line_per_input_in_order(tuned, mixed, tmp_path: Path) -> None:
    out = _infer(tuned.root, _jsonl(tmp_path / "mixed.jsonl", mixed))
    assert len(out) == len(mixed)
    for row, got in zip(mixed, out):
        assert isinstance(got.pop("prediction"), str)
        assert got == row


def test_infer_reads_stdin(tuned, mixed, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "mixed.jsonl", mixed)
    from_file = cli("infer", path, "-p", tuned.root, "--tokens-to-generate", "4", "-q")
    from_stdin = cli("infer", "-", "-p", tuned.root, "--tokens-to-generate", "4", "-q", input=path.read_text())
    ok(from_file)
    ok(from_stdin)
    assert from_stdin.stdout == from_file.stdout and from_file.stdout


def test_mixed_tags_get_their_own_prompts(tuned, mixed, tmp_path: Path) -> None:
    both = _infer(tuned.root, _jsonl(tmp_path / "mixed.jsonl", mixed))
    alone = {}
    for tag in ("sent", "topic"):
        rows = [r for r in mixed if r["prompt_tag"] == tag]
        alone.update(
            {
                (r["prompt_tag"], r["text"]): r["prediction"]
                for r in _infer(tuned.root, _jsonl(tmp_path / f"{tag}.jsonl", rows))
            }
        )
    assert {(r["prompt_tag"], r["text"]): r["prediction"] for r in both} == alone
    # the two prompts really differ in what they make the model say
    assert any(alone[("sent", t)] != alone[("topic", t)] for t in TEXTS)


def test_infer_json_with_accuracy(tuned, mixed, tmp_path: Path) -> None:
    preds = [r["prediction"] for r in _infer(tuned.root, _jsonl(tmp_path / "plain.jsonl", mixed))]
    # answers chosen so that accuracy is known: sent right on row 0 and wrong on row 2; topic right on row 3
    rows = [dict(r) for r in mixed]
    rows[0]["answer"], rows[2]["answer"], rows[3]["answer"] = preds[0] or "x", preds[2] + "x", preds[3] or "x"
    result = cli(
        "infer", _jsonl(tmp_path / "scored.jsonl", rows), "-p", tuned.root, "--tokens-to-generate", "4", "--json"
    )
    ok(result)
    doc = json.loads(result.stdout)
    assert [r.pop("prediction") for r in doc["predictions"]] == preds  # same rows and batches: same predictions
    assert doc["predictions"] == rows
    sent_right = int(bool(preds[0]))
    topic_right = int(bool(preds[3]))
    assert doc["accuracy"] == {
        "sent": {"correct": sent_right, "total": 2, "accuracy": sent_right / 2},
        "topic": {"correct": topic_right, "total": 1, "accuracy": topic_right / 1},
    }
    assert "accuracy" in result.stderr  # the table goes to people


def test_infer_rank_picks_from_the_answer_set(tuned, mixed, tmp_path: Path) -> None:
    sent = [r for r in mixed if r["prompt_tag"] == "sent"]
    path = _jsonl(tmp_path / "sent.jsonl", sent)
    out = _infer(tuned.root, path, "--mode", "rank")
    assert [r["id"] for r in out] == [r["id"] for r in sent]
    assert {r["prediction"] for r in out} <= {"positive", "negative"}  # the set seen in training
    forced = _infer(tuned.root, path, "--mode", "rank", "--choices", "positive, meh")
    assert {r["prediction"] for r in forced} <= {"positive", "meh"}
    result = cli("infer", path, "-p", tuned.root, "--mode", "rank", "--json")
    ok(result)
    assert "ranked answer set" in result.stderr


def test_infer_rank_needs_an_answer_set(tuned, mixed, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "mixed.jsonl", mixed)
    err = failed(cli("infer", path, "-p", tuned.root, "--mode", "rank"), 2)
    assert "--mode rank needs an answer set: 'topic' had none in training" in err  # 4 rows, 3 answers: free text
    assert "--choices" in err
    out = _infer(tuned.root, path, "--mode", "rank", "--choices", "sports,food,science,positive,negative")
    assert {r["prediction"] for r in out} <= {"sports", "food", "science", "positive", "negative"}
    assert "--choices needs at least two" in failed(
        cli("infer", path, "-p", tuned.root, "--mode", "rank", "--choices", "one"), 2
    )
    refused = cli("infer", path, "-p", tuned.root, "--mode", "vote")  # the CLI's choice check, before any model
    assert refused.exit_code == 2
    assert "Invalid value for '--mode'" in refused.stderr
    assert "'vote' is not one of 'generate', 'rank'" in refused.stderr


def test_tune_several_tags_in_one_run(base_project, data, tmp_path: Path) -> None:
    root = _copy(base_project.root, tmp_path)
    both = _jsonl(
        tmp_path / "both.jsonl",
        [json.loads(line) for f in (data.sent_train, data.topic_train) for line in f.read_text().splitlines()],
    )
    valid = _jsonl(
        tmp_path / "both_valid.jsonl",
        [json.loads(line) for f in (data.sent_valid, data.topic_valid) for line in f.read_text().splitlines()],
    )
    result = cli(
        "tune",
        "--tag",
        "sent",
        "--tag",
        "topic",
        "--train",
        both,
        "--valid",
        valid,
        *FAST,
        "--ensemble",
        "2",
        "-p",
        root,
        "--json",
    )
    ok(result)
    doc = json.loads(result.stdout)
    assert [r["tag"] for r in doc] == ["sent", "topic"] and all(r["steps"] == 2 for r in doc)
    assert "tuned 'sent': val_acc_rank" in result.stderr and "tuned 'topic': val_acc " in result.stderr
    assert bank.tags(proj.load(root)) == ["sent", "topic"]
    prompt, meta = bank.get(proj.load(root), "sent")
    assert prompt.shape[0] == 2 and meta.ensemble == 2  # both members in one file
    rows = [
        {"prompt_tag": t, "text": text}
        for t, text in (("sent", "i love it"), ("topic", "the team won"), ("sent", "i hate it"))
    ]
    path = _jsonl(tmp_path / "ens.jsonl", rows)
    voted = _infer(root, path, "--mode", "generate")  # the members vote
    assert [r["text"] for r in voted] == [r["text"] for r in rows] and all(
        isinstance(r["prediction"], str) for r in voted
    )
    ranked = _infer(root, path, "--mode", "rank", "--choices", "sports,food,science")  # the members' scores averaged
    assert all(r["prediction"] in {"sports", "food", "science"} for r in ranked)
    err = failed(cli("tune", "--tag", "sent", "--train", both, "--valid", valid, *FAST, "-p", root, "--overwrite"), 2)
    assert "prompt_tag 'topic' does not match the tag being tuned ('sent')" in err


def test_infer_unknown_tag(tuned, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "x.jsonl", [{"prompt_tag": "sent", "text": "a"}, {"prompt_tag": "nope", "text": "b"}])
    err = failed(cli("infer", path, "-p", tuned.root), 1)
    assert "unknown tag 'nope'; known tags: sent, topic" in err


# ---------------------------------------------------------------- infer's default mode and calibration


def _ran(*args):
    result = cli(*args)
    ok(result)
    return result


def test_each_tag_answers_the_way_its_prompt_was_chosen(tuned, mixed, tmp_path: Path) -> None:
    """sent (a closed answer set) was kept by ranked accuracy, topic (free text) by generation."""
    listed = json.loads(_ran("list-tags", "-p", tuned.root, "--json").stdout)
    assert {e["tag"]: e["mode"] for e in listed} == {"sent": "rank", "topic": "generate"}
    assert json.loads(_ran("show", "sent", "-p", tuned.root, "--json").stdout)["mode"] == "rank"
    assert "generate (infer's default)" in _ran("show", "topic", "-p", tuned.root).stderr
    path = _jsonl(tmp_path / "mixed.jsonl", mixed)
    doc = json.loads(_ran("infer", path, "-p", tuned.root, "--tokens-to-generate", "4", "--json", "-q").stdout)
    assert doc["modes"] == {"sent": "rank", "topic": "generate"}
    default = {r["id"]: r["prediction"] for r in doc["predictions"]}
    ranked = {
        r["id"]: r["prediction"]
        for r in _infer(
            tuned.root,
            _jsonl(tmp_path / "sent.jsonl", [r for r in mixed if r["prompt_tag"] == "sent"]),
            "--mode",
            "rank",
        )
    }
    generated = {r["id"]: r["prediction"] for r in _infer(tuned.root, path, "--mode", "generate")}
    assert {i: p for i, p in default.items() if i % 2 == 0} == ranked  # ids: sent even, topic odd
    assert {i: p for i, p in default.items() if i % 2 == 1} == {i: p for i, p in generated.items() if i % 2 == 1}
    overridden = json.loads(
        _ran("infer", path, "-p", tuned.root, "--mode", "generate", "--tokens-to-generate", "4", "--json", "-q").stdout
    )
    assert overridden["modes"] == {"sent": "generate", "topic": "generate"}  # --mode still overrides every tag


def test_a_record_without_a_mode_ranks_when_it_has_an_answer_set(tuned, tmp_path: Path) -> None:
    root = _copy(tuned.root, tmp_path)
    p = proj.load(root)
    for tag in ("sent", "topic"):
        prompt, meta = bank.get(p, tag)
        bank.put(p, tag, prompt, dataclasses.replace(meta, mode=None))  # as written before `mode` was recorded
        assert "mode" not in bank.read_meta(p, tag).record.to_json()
    listed = json.loads(_ran("list-tags", "-p", root, "--json").stdout)
    assert {e["tag"]: e["mode"] for e in listed} == {"sent": "rank", "topic": "generate"}


def test_calibrate_subtracts_the_content_free_scores(tuned, mixed, tmp_path: Path, lively_llama: Path) -> None:
    from ptcli.data.encode import answer_tokens
    from ptcli.lm.answers import calibrate
    from ptcli.lm.forward import choice_scores
    from ptcli.lm.rules import CONTENT_FREE

    sent = [r for r in mixed if r["prompt_tag"] == "sent"]
    out = _infer(tuned.root, _jsonl(tmp_path / "sent.jsonl", sent), "--calibrate")
    model, tok = load_base(str(lively_llama))
    prompt, meta = bank.get(proj.load(tuned.root), "sent")
    options = answer_tokens(tok, meta.choices)
    with torch.no_grad():
        scores = choice_scores(
            model, prompt, tok([r["text"] for r in sent], add_special_tokens=False).input_ids, options, tok.pad_token_id
        )
        free = choice_scores(
            model, prompt, tok(list(CONTENT_FREE), add_special_tokens=False).input_ids, options, tok.pad_token_id
        )
    expected = [meta.choices[j] for j in calibrate(scores, free).argmax(-1).tolist()]
    assert [r["prediction"] for r in out] == expected
    err = failed(
        cli(
            "infer",
            _jsonl(tmp_path / "topic.jsonl", [r for r in mixed if r["prompt_tag"] == "topic"]),
            "-p",
            tuned.root,
            "--calibrate",
        ),
        2,
    )
    assert "--calibrate corrects ranked answers" in err
