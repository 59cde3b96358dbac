"""`--engine llama.cpp` on the default model's own GGUF file: the torch path's answers, and its refusals.

llama.cpp computes with the file's quantized weights (and 8-bit activations), the torch path
with the same weights dequantized: scores agree to a fraction of a nat, answers on nearly all
rows. Skipped only where the `llamacpp` extra is not installed (the test command installs it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from clihelp import cli, failed, ok, write_jsonl

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def _rows(split: str, tag: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (EXAMPLES / f"{split}.jsonl").read_text().splitlines()]
    return [r for r in rows if r["prompt_tag"] == tag][:n]


@pytest.fixture(autouse=True)
def _converted_once(monkeypatch: pytest.MonkeyPatch, default_cache: Path) -> None:
    """Every test of the module reads the session's cache: the GGUF is converted (and fingerprinted) once."""
    monkeypatch.setenv("PTCLI_CACHE", str(default_cache))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, default_cache: Path) -> Path:
    """The default base, three tags a few steps tuned: a prefix prompt, a suffix ensemble of two, a topic prompt."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PTCLI_CACHE", str(default_cache))
    d = tmp_path_factory.mktemp("lcp")
    root = d / "p"
    ok(cli("init", root, "--num-prompt-tokens", 8, "-q"))
    tasks = {
        "reviews": ["--init-text", "is this review positive or negative"],
        "reviews_suffix": ["--init-text", "positive or negative?", "--template", "suffix", "--ensemble", 2],
        "topic": ["--init-text", "what is the topic of this news"],
    }
    for tag, flags in tasks.items():
        source = "reviews" if tag.startswith("reviews") else tag
        rows = [{**r, "prompt_tag": tag} for r in _rows("train", source, 32)]
        train = write_jsonl(d / f"{tag}.jsonl", rows)
        args = ["--train", train, "--valid", train, "--max-steps", 4, "--val-check-interval", 4, "--batch-size", 8]
        ok(cli("tune", "--tag", tag, *args, "--lr", 0.05, *flags, "-p", root, "-q"))
    test = [{**r, "prompt_tag": t} for t in tasks for r in _rows("test", "reviews" if "reviews" in t else t, 24)]
    write_jsonl(d / "test.jsonl", test)
    yield root
    mp.undo()


def _infer(project: Path, *flags: object) -> list[dict]:
    result = cli("infer", project.parent / "test.jsonl", "-p", project, "-q", *flags)
    ok(result)
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize(("mode", "agree"), [("rank", 0.9), ("generate", 0.8)])
def test_llamacpp_answers_as_the_torch_path_does(project: Path, mode: str, agree: float) -> None:
    """Prompts tuned 4 steps leave flat distributions, where 8-bit activations tip near-ties: greedy texts
    (3 tokens here) drift more than ranked answers. bench/engines.py measures tuned prompts. llama.cpp's
    kernels differ by CPU: ranked rows agreed on 68 of 72 on an AMD EPYC VM (2026-12-04), more elsewhere."""
    flags = ["--mode", mode, "--tokens-to-generate", 3]
    torch_rows = _infer(project, *flags)
    lcp_rows = _infer(project, *flags, "--engine", "llama.cpp")
    assert [r["text"] for r in lcp_rows] == [r["text"] for r in torch_rows]  # input order
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(torch_rows, lcp_rows))
    assert same >= agree * len(torch_rows), (same, len(torch_rows))


# --llama-weights -> the most and mean a candidate's score may differ from torch's (nats; measured 2026-12-03:
# file 0.49 / 0.19, q8_0 0.62 / 0.22, bf16 0.19 / 0.075, f32 0.010 / 0.004). The file's Q4_1 and a Q8_0
# re-encoding multiply 8-bit activations; bf16 rounds weights and activations to 8 bits of mantissa; f32
# computes as torch does but keeps keys and values in float16.
BOUNDS = {"file": (0.75, 0.3), "q8_0": (0.75, 0.3), "bf16": (0.35, 0.15), "f32": (0.05, 0.02)}


@pytest.mark.parametrize("weights", list(BOUNDS))
def test_ranked_scores_match_to_a_fraction_of_a_nat(project: Path, weights: str) -> None:
    """Every candidate's summed log-likelihood, llama.cpp against torch, for prefix, suffix and ensemble rows."""
    import torch

    from ptcli.config import BaseOptions
    from ptcli.enums import Backend, LlamaWeights, Mode
    from ptcli.inference.engine import Item, Prompt
    from ptcli.inference.infer import open_engine, records_of
    from ptcli.lm.answers import run_rows
    from ptcli.project import bank
    from ptcli.project import manifest as proj

    p = proj.load(project)
    lcp = open_engine(
        p, BaseOptions(engine=Backend.LLAMACPP, llama_weights=LlamaWeights(weights)), 1, "cpu", lambda _: None
    )
    ref = open_engine(p, BaseOptions(), 1, "cpu", lambda _: None)
    most, mean = BOUNDS[weights]
    for tag in ("reviews", "reviews_suffix"):
        prompt = Prompt.of(tag, *bank.get(p, tag))
        rows = [r for r in records_of(project.parent / "test.jsonl") if r.tag == tag][:12]
        items = [Item(prompt, r.text, Mode.RANK, 0, tuple(prompt.record.choices)) for r in rows]
        seqs = ref.rows(items)
        got = torch.from_numpy(np.stack(lcp.scores(items, seqs)))  # (B, K, C)
        with torch.inference_mode():
            out = run_rows(ref.model, ref.tok, [prompt.members], seqs, [0] * len(seqs), choices=list(items[0].choices))
        assert out.scores is not None
        want = torch.stack(out.scores)
        assert got.shape == want.shape == (len(items), prompt.members.shape[0], len(prompt.record.choices))
        diff = (got - want).abs()
        assert diff.max() < most and diff.mean() < mean, (tag, diff.max(), diff.mean())


def _without(*modules: str) -> str:
    """A `python -c` script that runs ptcli's CLI where any import of `modules` fails."""
    return f"import sys\nfor m in {modules!r}: sys.modules[m] = None\nfrom ptcli.cli.app import main\n" + (
        "sys.argv = ['ptcli', *sys.argv[1:]]\nmain()\n"
    )


NO_TORCH = _without("torch", "transformers")
# serve renders chat templates with transformers' jinja renderer (transformers.utils), nothing heavier of it
NO_TORCH_SERVE = _without(
    "torch", "transformers.models", "transformers.modeling_utils", "transformers.tokenization_utils_base"
)


@pytest.mark.parametrize("flags", [["--mode", "generate"], ["--mode", "rank", "--calibrate"]])
def test_llamacpp_infer_runs_without_torch(project: Path, default_cache: Path, flags: list[str]) -> None:
    """`ptcli infer --engine llama.cpp` imports neither torch nor transformers (their ~250 MB are the torch path's),
    and answers as the same engine does in a process that has them. That process runs first: the base's
    fingerprint is computed with torch once per GGUF file and kept beside its converted copy."""
    args = ["infer", project.parent / "test.jsonl", "-p", project, "-q", "--engine", "llama.cpp", *flags]
    want = _infer(project, *args[5:])
    env = {**os.environ, "PTCLI_CACHE": str(default_cache)}
    run = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [json.loads(line) for line in run.stdout.splitlines()] == want


def test_what_llamacpp_cannot_do_is_refused_by_name(project: Path, tiny_llama: Path, tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt_tag": "reviews", "text": "great"}])
    err = failed(cli("infer", rows, "-p", project, "--engine", "llama.cpp", "--devices", 2), 2)
    assert "llama.cpp runs in one process" in err
    err = failed(cli("infer", rows, "-p", project, "--engine", "llama.cpp", "--dtype", "bfloat16"), 2)
    assert "--dtype applies to --engine torch" in err
    err = failed(cli("infer", rows, "-p", project, "--engine", "llama.cpp", "--device-map", "auto"), 2)
    assert "llama.cpp runs in one process" in err
    hf = tmp_path / "hf"
    ok(cli("init", hf, "--base", tiny_llama, "--num-prompt-tokens", 4, "-q"))
    err = failed(cli("infer", rows, "-p", hf, "--engine", "llama.cpp"), 2)
    assert "--engine llama.cpp runs a GGUF base" in err and str(tiny_llama) in err


def test_a_late_prompt_is_refused_not_answered_by_torch(project: Path, tmp_path: Path) -> None:
    late = [{**r, "prompt_tag": "late"} for r in _rows("train", "reviews", 8)]
    train = write_jsonl(tmp_path / "late.jsonl", late)
    flags = ["--max-steps", 1, "--val-check-interval", 1, "--batch-size", 4, "--prompt-layer", 20]
    ok(cli("tune", "--tag", "late", "--train", train, "--valid", train, *flags, "-p", project, "-q"))
    try:
        err = failed(cli("infer", train, "-p", project, "--engine", "llama.cpp", "-q"), 2)
        assert "takes prompts at the input embeddings; 'late' enters before block 20" in err
    finally:
        ok(cli("remove-tag", "late", "-p", project, "-q"))


def test_logprobs_match_the_torch_paths_to_a_fraction_of_a_nat(project: Path) -> None:
    """The generated tokens' log-probabilities (what `serve` returns as logprobs), llama.cpp against torch, on the
    rows where both engines generate the same tokens; every listed token is its step's likeliest."""
    from ptcli.config import BaseOptions
    from ptcli.enums import Backend, Mode
    from ptcli.inference.engine import Item, Prompt
    from ptcli.inference.infer import open_engine, records_of
    from ptcli.project import bank
    from ptcli.project import manifest as proj

    p = proj.load(project)
    lcp = open_engine(p, BaseOptions(engine=Backend.LLAMACPP), 1, "cpu", lambda _: None)
    ref = open_engine(p, BaseOptions(), 1, "cpu", lambda _: None)
    diffs, rows = [], 0
    for tag in ("reviews", "reviews_suffix", "topic"):  # a prefix prompt, a suffix ensemble, another task
        prompt = Prompt.of(tag, *bank.get(p, tag))
        texts = [r.text for r in records_of(project.parent / "test.jsonl") if r.tag == tag][:8]
        items = [Item(prompt, t, Mode.GENERATE, 4, logprobs=2) for t in texts]
        seqs = ref.rows(items)
        for a, b in zip(lcp.run(items, seqs), ref.run(items, seqs)):
            for answer in (a, b):
                assert answer.logprobs is not None and len(answer.logprobs) == answer.tokens
                assert all(s.top[0] == (s.token, s.logprob) and len(s.top) == 2 for s in answer.logprobs)
            if [s.token for s in a.logprobs] == [s.token for s in b.logprobs]:
                rows += 1
                diffs += [abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)]
    assert rows >= 12 and diffs, rows  # of 24
    assert max(diffs) < 0.75 and sum(diffs) / len(diffs) < 0.3, (max(diffs), sum(diffs) / len(diffs))


def test_serve_with_llamacpp_answers_the_openai_client(project: Path) -> None:
    """Each request alone (a batch of one), against the engine given that row alone: llama.cpp's sums depend on a
    batch's shape, so a near-tie may tip otherwise in a batch of other rows. The server imports no torch, nor
    transformers' models and tokenizers (its chat template renders through transformers' jinja renderer)."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from ptcli.config import BaseOptions
    from ptcli.enums import Backend
    from ptcli.inference.engine import Item, Prompt
    from ptcli.inference.infer import open_engine
    from ptcli.lm.source import resolve
    from ptcli.project import bank
    from ptcli.project import manifest as proj

    rows = [json.loads(line) for line in (project.parent / "test.jsonl").read_text().splitlines()][::12]
    p = proj.load(project)
    engine = open_engine(p, BaseOptions(engine=Backend.LLAMACPP), 1, "cpu", lambda _: None)
    prompts = {t: Prompt.of(t, *bank.get(p, t)) for t in {r["prompt_tag"] for r in rows}}
    want = [engine([Item(prompts[r["prompt_tag"]], r["text"], max_new=4)])[0] for r in rows]
    messages = [{"role": "user", "content": rows[0]["text"]}]  # /v1/chat/completions: the rendered conversation
    rendered = AutoTokenizer.from_pretrained(resolve("default", lambda _: None)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    want_chat = engine([Item(prompts[rows[0]["prompt_tag"]], rendered, max_new=4)])[0].text
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-c",
        NO_TORCH_SERVE,
        "serve",
        "-p",
        str(project),
        "--port",
        str(port),
        "--engine",
        "llama.cpp",
    ]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except Exception:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.5)
        for r, w in zip(rows, want):
            got = client.completions.create(model=r["prompt_tag"], prompt=r["text"], max_tokens=4, temperature=0)
            assert got.choices[0].text.strip() == w.text
        chat = client.chat.completions.create(model=rows[0]["prompt_tag"], messages=messages, max_tokens=4)
        assert chat.choices[0].message.content == want_chat
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_a_reencoding_is_made_once_and_answers_as_the_file_does(project: Path, default_cache: Path) -> None:
    """--llama-weights bf16: llama.cpp's quantizer writes the copy once, beside the converted base; a second run
    reads it as it is. Its ranked answers are the torch path's on nearly every row, as the file's are."""
    torch_rows = _infer(project, "--mode", "rank")
    bf16_rows = _infer(project, "--mode", "rank", "--engine", "llama.cpp", "--llama-weights", "bf16")
    (made,) = default_cache.glob("models/*/ptcli-bf16.gguf")
    stamp = made.stat().st_mtime_ns
    assert _infer(project, "--mode", "rank", "--engine", "llama.cpp", "--llama-weights", "bf16") == bf16_rows
    assert made.stat().st_mtime_ns == stamp
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(torch_rows, bf16_rows))
    assert same >= 0.95 * len(torch_rows), (same, len(torch_rows))
    assert not list(made.parent.glob(".ptcli-*"))  # no temporary left


def test_a_failed_reencoding_keeps_nothing(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's quantizer fails half way (a full disk): a clear error, no partial file kept or read later."""
    import llama_cpp

    from ptcli.enums import LlamaWeights
    from ptcli.errors import ModelError
    from ptcli.inference.llama_context import weights_of
    from ptcli.lm.source import default_gguf

    def half_written(src: bytes, dst: bytes, params: object) -> int:
        Path(dst.decode()).write_bytes(b"GGUF" + b"\0" * 64)
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", half_written)
    with pytest.raises(ModelError, match="could not re-encode .* as q8_0; nothing was kept"):
        weights_of(default_gguf(), tmp_path, LlamaWeights.Q8_0, lambda _: None)
    assert list(tmp_path.iterdir()) == []
    assert weights_of(default_gguf(), tmp_path, LlamaWeights.FILE, lambda _: None) == default_gguf()


def test_llama_weights_without_the_llama_engine_is_refused(project: Path, tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt_tag": "reviews", "text": "great"}])
    err = failed(cli("infer", rows, "-p", project, "--llama-weights", "bf16"), 2)
    assert "--llama-weights bf16 applies to --engine llama.cpp only" in err


def test_eval_scores_with_llamacpp_on_reencoded_weights(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ptcli eval --engine llama.cpp --llama-weights bf16` ranks the harness's choices as `ptcli infer --mode rank`
    does on the same engine and weights (offline, on a task YAML over local rows)."""
    pytest.importorskip("lm_eval")
    from test_harness import TASK

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows = _rows("test", "reviews", 24)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "tasks").mkdir()
    extra = 'doc_to_choice: ["positive", "negative"]'
    (tmp_path / "tasks" / "mc.yaml").write_text(
        TASK.format(name="ptcli_mc", data=data, kind="multiple_choice", metric="acc", extra=extra)
    )
    engine = ["--engine", "llama.cpp", "--llama-weights", "bf16"]
    args = ["eval", "--tag", "reviews", "--tasks", "ptcli_mc", "--include-path", tmp_path / "tasks", "--json"]
    result = cli(*args, *engine, "-p", project, "-q")
    ok(result)
    got = json.loads(result.stdout)["results"]["ptcli_mc"]["acc,none"]
    said = cli("infer", data, "--mode", "rank", "--choices", "positive,negative", *engine, "-p", project, "-q")
    ok(said)
    predictions = [json.loads(line)["prediction"] for line in said.stdout.splitlines()]
    want = sum(p == r["answer"] for p, r in zip(predictions, rows)) / len(rows)
    assert abs(got - want) <= 1 / len(rows), (got, want)  # other batches: a near tie may fall the other way
    err = failed(cli(*args, "--llama-weights", "bf16", "-p", project), 2)
    assert "--llama-weights bf16 applies to --engine llama.cpp only" in err


def test_the_cache_grows_for_a_row_that_needs_more_cells(project: Path) -> None:
    """The context starts at 2048 cells; a ranked ensemble row over a long text needs more (each member reads it
    once per candidate): the cache grows to hold it, and its answer is the one a large cache from the start gives."""
    from ptcli.config import BaseOptions
    from ptcli.enums import Backend, Mode
    from ptcli.inference.engine import Item, Prompt
    from ptcli.inference.infer import open_engine
    from ptcli.inference.llama_context import N_CTX, Context
    from ptcli.project import bank
    from ptcli.project import manifest as proj

    p = proj.load(project)
    lcp = open_engine(p, BaseOptions(engine=Backend.LLAMACPP), 1, "cpu", lambda _: None)
    assert lcp.llama.n_ctx == N_CTX == 2048
    prompt = Prompt.of("reviews_suffix", *bank.get(p, "reviews_suffix"))  # two members
    long = " ".join(r["text"] for r in _rows("test", "reviews", 24) * 3)  # cut from the left to the tag's length
    items = [
        Item(prompt, long, Mode.RANK, 0, tuple(prompt.record.choices)),
        Item(prompt, "great", Mode.RANK, 0, tuple(prompt.record.choices)),
    ]
    seqs = lcp.rows(items)
    assert len(seqs[0]) > 400  # two members x three sequences each (the row, a copy per candidate) > 2048 cells
    grown = lcp.run(items, seqs)
    assert lcp.llama.n_ctx == 4096
    lcp.llama.close()
    lcp.llama = Context(lcp.llama.gguf, n_ctx=8192)
    large = lcp.run(items, seqs)
    assert lcp.llama.n_ctx == 8192
    assert [a.text for a in grown] == [a.text for a in large]
    for a, b in zip(grown, large):
        assert max(abs(x - y) for x, y in zip(a.scores, b.scores)) < 1e-3, (a.scores, b.scores)
