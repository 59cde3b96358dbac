"""`export --format trtllm` and `import --format trtllm`: the TensorRT-LLM prompt table, its task map, the round trip
and the refusals, end to end through the CLI on a tiny model project (prompts put in the bank, not tuned).

TensorRT-LLM itself is not installed here (it needs CUDA): these tests hold the folder to the layout TensorRT-LLM's
runners read (a (T, P, H) .npy table, one block per task) and to what ptcli put in.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from clihelp import cli, failed, ok, write_jsonl

from ptcli.config import TaskConfig
from ptcli.enums import Mode
from ptcli.project import bank
from ptcli.project import manifest as proj
from ptcli.project.record import PromptRecord

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P, H = 4, 32
TAGS = ["alpha", "beta", "gamma"]


def _record(**config) -> PromptRecord:
    return PromptRecord(
        config={**TaskConfig().to_dict(), "max_seq_length": 64, **config},
        choices=["negative", "positive"],
        mode=Mode.RANK,
        init="random",
    )


def _prompt(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (P, H)), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> SimpleNamespace:
    """A project on lively_llama with three prefix prompts in the bank (beta put first: the table is in tag order)."""
    root = tmp_path_factory.mktemp("trtllm") / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", P, "-q"))
    p = proj.load(root)
    prompts = {}
    for seed, tag in enumerate(["beta", "alpha", "gamma"]):
        prompts[tag] = _prompt(seed)
        bank.put(p, tag, prompts[tag], _record())
    return SimpleNamespace(root=root, prompts=prompts, base=lively_llama)


@pytest.fixture
def root(made, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made.root, tmp_path / "copy"))


def _load_table(folder: Path) -> np.ndarray:
    return np.load(folder / "prompt_table.npy", allow_pickle=False)


def test_every_tag_goes_into_one_table_in_tag_order(made, tmp_path: Path) -> None:
    out = tmp_path / "engine-prompts"
    result = cli("export", out, "--format", "trtllm", "-p", made.root, "--json")  # no tag: every tag of the bank
    ok(result)
    files = [str(out / n) for n in ("prompt_table.npy", "prompt_tasks.json", "README.md")]
    assert json.loads(result.stdout) == {
        "tags": TAGS,
        "format": "trtllm",
        "path": str(out),
        "files": files,
        "dtype": "float16",
        "shape": [3, P, H],
    }
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "prompt_table.npy", "prompt_tasks.json"]
    table = _load_table(out)
    assert table.shape == (3, P, H) and table.dtype == np.float16  # one block of P rows per task; float16 by default
    for t, tag in enumerate(TAGS):  # task t is the t-th tag in sorted order, whatever order the bank was filled in
        assert np.array_equal(table[t], made.prompts[tag].numpy().astype(np.float16))
    meta = json.loads((out / "prompt_tasks.json").read_text())
    assert meta["tasks"] == {tag: {"task_id": t, "prompt_length": P} for t, tag in enumerate(TAGS)}
    assert (meta["shape"], meta["dtype"], meta["max_prompt_embedding_table_size"]) == ([3, P, H], "float16", 3 * P)
    assert meta["sha256"] == hashlib.sha256((out / "prompt_table.npy").read_bytes()).hexdigest()
    p = proj.load(made.root)
    assert meta["base"] == {"ref": p.base.ref, "fingerprint": p.base.fingerprint, "hidden_size": H}
    assert meta["records"]["beta"]["config"]["template"] == "prefix"
    readme = (out / "README.md").read_text()
    for needle in (
        "| 0 | alpha | 4 |",
        "| 2 | gamma | 4 |",
        "--max_prompt_embedding_table_size 12",
        "--prompt_tasks 0,1,2 --num_prepend_vtokens 4 4 4",
        "[VOCAB + i for i in range(4)] + tokenizer(text, add_special_tokens=False).input_ids",
        "VOCAB + t*4 + i",
        "ptcli did not run it on TensorRT-LLM",
    ):
        assert needle in readme, needle


def test_named_tags_in_float32_keep_the_exact_values(made, tmp_path: Path) -> None:
    out = tmp_path / "two"
    ok(cli("export", "gamma", "alpha", out, "--format", "trtllm", "--dtype", "float32", "-p", made.root, "-q"))
    table = _load_table(out)
    assert table.dtype == np.float32 and table.shape == (2, P, H)
    assert np.array_equal(table[0], made.prompts["alpha"].numpy()) and np.array_equal(
        table[1], made.prompts["gamma"].numpy()
    )
    assert json.loads((out / "prompt_tasks.json").read_text())["tasks"] == {
        "alpha": {"task_id": 0, "prompt_length": P},
        "gamma": {"task_id": 1, "prompt_length": P},
    }


def test_round_trip_gives_the_prompts_back_within_the_dtype(made, tmp_path: Path) -> None:
    out = tmp_path / "table"
    ok(cli("export", out, "--format", "trtllm", "-p", made.root, "-q"))
    other = tmp_path / "other"  # a second project on the same base: the tags are free there
    ok(cli("init", other, "--base", made.base, "--num-prompt-tokens", P, "-q"))
    result = cli("import", out, "-p", other, "--json")  # a folder holding prompt_tasks.json: trtllm is implied
    ok(result)
    imported = json.loads(result.stdout)
    assert [r["tag"] for r in imported] == TAGS and {r["format"] for r in imported} == {"trtllm"}
    p, src = proj.load(other), proj.load(made.root)
    for t, tag in enumerate(TAGS):
        back, meta = bank.get(p, tag)
        assert back.dtype == torch.float32
        assert torch.equal(back, made.prompts[tag].half().float())  # exactly float16's rounding of the prompt
        assert torch.allclose(back, made.prompts[tag], rtol=1e-3, atol=1e-3)
        before = bank.get(src, tag)[1]
        assert (meta.config, meta.choices, meta.mode, meta.init) == (
            before.config,
            before.choices,
            before.mode,
            "random",
        )
        assert meta.imported_from == {"format": "trtllm", "path": str(out.resolve()), "task_id": t, "dtype": "float16"}


def test_a_float32_round_trip_is_exact_and_answers_alike(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "one"
    ok(cli("export", "beta", out, "--format", "trtllm", "--dtype", "float32", "-p", root, "-q"))
    err = failed(cli("import", out, "-p", root), 1)
    assert "tag 'beta' already in the bank" in err and "--tag" in err
    ok(cli("import", out, "--tag", "beta2", "-p", root, "-q"))  # a one-task folder takes --tag
    p = proj.load(root)
    assert torch.equal(bank.get(p, "beta2")[0], bank.get(p, "beta")[0])
    rows = write_jsonl(
        tmp_path / "rows.jsonl", [{"prompt_tag": t, "text": "i love the movie"} for t in ("beta", "beta2")]
    )
    result = cli("infer", rows, "-p", root, "--mode", "generate", "--tokens-to-generate", "3")
    ok(result)
    a, b = (json.loads(line)["prediction"] for line in result.stdout.splitlines())
    assert a == b


def _refusing_bank(root: Path) -> None:
    p = proj.load(root)
    bank.put(p, "late", _prompt(7), _record(prompt_layer=1))
    bank.put(p, "deep", _prompt(8, 2 * P, H), PromptRecord(config=_record().config, depth=2))
    bank.put(p, "vote", _prompt(9, 2, P, H), _record())
    bank.put(p, "around", _prompt(10), _record(template="{text}{prompt}{answer}"))


def test_what_the_table_cannot_express_is_refused_with_the_reason(root: Path, tmp_path: Path) -> None:
    _refusing_bank(root)
    out = tmp_path / "x"
    err = failed(cli("export", out, "--format", "trtllm", "-p", root), 2)  # every tag: all refusals at once
    for reason in (
        "'around' places its prompt by the template '{text}{prompt}{answer}'",
        "'deep' is a deep prompt (vectors for 2 blocks, entered as hidden states)",
        "'late' is a late prompt: it enters before block 1",
        "'vote' is an ensemble of 2 prompts that answer by vote, and a TensorRT-LLM prompt table holds one prompt",
    ):
        assert reason in err, reason
    assert "ptcli embed" in err  # the hint names what can carry them
    assert not out.exists()
    assert "'late' is a late prompt" in failed(cli("export", "alpha", "late", out, "--format", "trtllm", "-p", root), 2)
    ok(cli("export", "alpha", out, "--format", "trtllm", "-p", root, "-q"))  # the rest still exports


def test_bad_outputs_and_flags_are_refused(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    err = failed(cli("export", "alpha", out, "--format", "trtllm", "--dtype", "bfloat16", "-p", root), 2)
    assert "a .npy file has no bfloat16" in err and "float32" in err
    ok(cli("export", "alpha", out, "--format", "trtllm", "-p", root, "-q"))
    err = failed(cli("export", "beta", out, "--format", "trtllm", "-p", root), 2)
    assert "already holds an export" in err and "--force" in err
    ok(cli("export", "beta", out, "--format", "trtllm", "--force", "-p", root, "-q"))
    assert list(json.loads((out / "prompt_tasks.json").read_text())["tasks"]) == ["beta"]
    (tmp_path / "file").write_text("x")
    assert "is a file" in failed(cli("export", "alpha", tmp_path / "file", "--format", "trtllm", "-p", root), 2)
    err = failed(cli("export", "alpha", "beta", tmp_path / "p", "--format", "peft", "-p", root), 2)
    assert "--format peft exports one tag" in err and "--format trtllm" in err
    assert "takes no --dtype" in failed(cli("export", "alpha", tmp_path / "a.st", "--dtype", "float16", "-p", root), 2)
    assert "unknown tag 'nope'" in failed(cli("export", "nope", out, "--format", "trtllm", "-p", root), 1)
    assert "is not a valid tag" in failed(cli("export", "../x", out, "--format", "trtllm", "-p", root), 2)
    bank.put(proj.load(root), "huge", _prompt(3) * 1e6, _record())
    err = failed(cli("export", "huge", tmp_path / "h", "--format", "trtllm", "-p", root), 2)
    assert "beyond float16's 65504" in err and "--dtype float32" in err
    ok(cli("export", "huge", tmp_path / "h", "--format", "trtllm", "--dtype", "float32", "-p", root, "-q"))


def _rewrite_table(folder: Path, array: np.ndarray, **np_save) -> None:
    """Put another .npy in the folder and fix its map's sha256 and shape, so only the array itself is wrong."""
    buf = io.BytesIO()
    np.save(buf, array, **np_save)
    (folder / "prompt_table.npy").write_bytes(buf.getvalue())
    meta = json.loads((folder / "prompt_tasks.json").read_text())
    meta["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (folder / "prompt_tasks.json").write_text(json.dumps(meta))


def test_import_refuses_damaged_foreign_and_pickled_folders(root: Path, made, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    ok(cli("export", out, "--format", "trtllm", "-p", made.root, "-q"))
    err = failed(cli("import", out, "--tag", "x", "-p", root), 2)
    assert "--tag names one prompt" in err and "3 tasks (alpha, beta, gamma)" in err
    other = tmp_path / "other-base"
    ok(cli("init", other, "--base", tiny_llama, "--num-prompt-tokens", P, "-q"))
    err = failed(cli("import", out, "-p", other), 1)
    assert "task 'alpha' was tuned on base" in err and "this project's base is" in err

    damaged = Path(shutil.copytree(out, tmp_path / "damaged"))
    blob = bytearray((damaged / "prompt_table.npy").read_bytes())
    blob[-1] ^= 0x01
    (damaged / "prompt_table.npy").write_bytes(bytes(blob))
    assert "does not match the sha256" in failed(cli("import", damaged, "-p", other), 1)

    pickled = Path(shutil.copytree(out, tmp_path / "pickled"))
    _rewrite_table(pickled, np.array([{"not": "numbers"}], dtype=object), allow_pickle=True)
    assert "is not a plain .npy array" in failed(cli("import", pickled, "-p", other), 2)  # never unpickled

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "prompt_table.npy", bare)  # a table alone (as NeMo's converter writes) names no tags
    err = failed(cli("import", bare, "--format", "trtllm", "-p", other), 2)
    assert "holds no prompt_tasks.json" in err
    assert bank.tags(proj.load(other)) == []
