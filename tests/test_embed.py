"""`ptcli embed`: rows as vLLM `prompt_embeds`, decoded as vLLM decodes them and held to what ptcli's own forward
feeds the base (block 0's input, hooked), to its logits, and to its greedy answers; the refusals.

vLLM is not installed here (its wheel is a CUDA build of ~340 MB pinned to another torch): the tests decode the
payload the way vLLM's completions server does (`torch.load(..., weights_only=True)` of the base64) and run the
tensor through the same Transformers model as `model(inputs_embeds=...)`, which is what vLLM computes with it.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from clihelp import cli, failed, ok, write_jsonl

from ptcli.config import TaskConfig
from ptcli.enums import Mode
from ptcli.inference.engine import Engine, Item, Prompt
from ptcli.lm.base import load_base
from ptcli.lm.batch import to_logits
from ptcli.lm.depth import blocks_of
from ptcli.lm.forward import read
from ptcli.lm.placed import placed_read
from ptcli.project import bank
from ptcli.project import manifest as proj
from ptcli.project.record import PromptRecord

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P, H, MAX_SEQ = 4, 32, 64
TEMPLATES = {
    "pre": "prefix",  # [prompt][text]: the shared-prefix fast path
    "lit": "{prompt}{text}\\nAnswer:{answer}",  # prefix, with a literal after the text
    "around": "Review: {text}{prompt:2} Sentiment:{prompt}{answer}",  # text before and between the prompt's slots
}
LONG = " ".join(["the movie was great and i loved it"] * 12)  # over the budget: cut from the left


def _record(template: str, **extra) -> PromptRecord:
    config = {**TaskConfig().to_dict(), "max_seq_length": MAX_SEQ, "template": template, **extra}
    return PromptRecord(config=config, mode=Mode.GENERATE, init="random")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> SimpleNamespace:
    """A project on lively_llama with one prompt per template (put, not tuned), and the base loaded beside it."""
    root = tmp_path_factory.mktemp("embed") / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", P, "-q"))
    p = proj.load(root)
    for seed, (tag, template) in enumerate(TEMPLATES.items()):
        prompt = torch.randn(P, H, generator=torch.Generator().manual_seed(seed)) * 0.5
        bank.put(p, tag, prompt, _record(template))
    model, tok = load_base(str(lively_llama))
    return SimpleNamespace(root=root, model=model, tok=tok)


def _rows() -> list[dict]:
    return [
        {"prompt_tag": tag, "text": text, "answer": "positive", "id": f"{tag}-{i}"}
        for tag in TEMPLATES
        for i, text in enumerate(["i love the movie", LONG])
    ]


def _embed(root: Path, path: Path, *flags) -> list[dict]:
    result = cli("embed", path, "-p", root, "-q", *flags)
    ok(result)
    return [json.loads(line) for line in result.stdout.splitlines()]


def _vllm_decode(payload: str) -> torch.Tensor:
    """What vLLM's completions server does with a `prompt_embeds` field (serving engine, `_load_prompt_embeds`)."""
    tensor = torch.load(io.BytesIO(base64.b64decode(payload)), weights_only=True)
    assert isinstance(tensor, (torch.FloatTensor, torch.BFloat16Tensor, torch.HalfTensor)) and tensor.dim() == 2
    return tensor


def _fed_to_block_0(model, tok, project: proj.ProjectDir, tag: str, text: str, max_new: int) -> torch.Tensor:
    """The hidden states ptcli's own engine hands the first decoder block for one row, all its calls joined (N, H).

    The prefix path runs the prompt and the tokens in two calls, a template path the text before the first slot
    and the rest; with max_new=1 no decoding step follows.
    """
    seen: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    engine = Engine(model, tok)
    item = Item(Prompt.of(tag, *bank.get(project, tag)), text, Mode.GENERATE, max_new)
    seqs = engine.rows([item])
    handle = blocks_of(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine.run([item], seqs)
    finally:
        handle.remove()
    return torch.cat(seen, dim=1)[0]  # (N, H)


def test_the_embeddings_are_what_ptclis_forward_feeds_the_base(made, tmp_path: Path) -> None:
    rows = _rows()
    out = _embed(made.root, write_jsonl(tmp_path / "rows.jsonl", rows), "--tokens-to-generate", "1")
    assert [{k: r[k] for k in ("prompt_tag", "text", "answer", "id")} for r in out] == rows  # input order, fields kept
    p = proj.load(made.root)
    for row in out:
        x = _vllm_decode(row["prompt_embeds"])
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size()  # the payload holds the row, no more
        assert (row["shape"], row["dtype"], row["max_tokens"]) == (list(x.shape), "float32", 1)
        fed = _fed_to_block_0(made.model, made.tok, p, row["prompt_tag"], row["text"], 1)
        assert torch.equal(x, fed), row["id"]
    long_pre = next(r for r in out if r["id"] == "pre-1")
    assert long_pre["shape"] == [MAX_SEQ - 1, H] and long_pre["truncated"]  # prompt + cut text + 1 fill the budget
    assert long_pre["text_tokens"] == MAX_SEQ - 1 - P
    short = next(r for r in out if r["id"] == "around-0")
    assert not short["truncated"] and short["text_tokens"] == len(made.tok("i love the movie").input_ids)


def test_logits_from_the_embeddings_equal_ptclis_for_the_row(made, tmp_path: Path) -> None:
    out = _embed(made.root, write_jsonl(tmp_path / "rows.jsonl", _rows()), "--tokens-to-generate", "8")
    p = proj.load(made.root)
    engine = Engine(made.model, made.tok)
    for row in out:
        prompt = Prompt.of(row["prompt_tag"], *bank.get(p, row["prompt_tag"]))
        seq = engine.rows([Item(prompt, row["text"], Mode.GENERATE, 8)])[0]
        pad = made.tok.pad_token_id
        with torch.inference_mode():
            r = (
                read(made.model, prompt.members, [seq], pad)
                if engine.layout(prompt).prefix
                else placed_read(made.model, prompt.members, [seq], pad, train=False)
            )
            ours = to_logits(made.model, r.hidden[:, -1])[0]  # (V,): ptcli's next-token logits for the row
            theirs = made.model(inputs_embeds=_vllm_decode(row["prompt_embeds"])[None]).logits[0, -1]  # (V,)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), row["id"]


def test_greedy_decoding_from_the_embeddings_gives_ptclis_answers(made, tmp_path: Path) -> None:
    """What a vLLM server does with the request (greedy, max_tokens): generate from the embeddings alone."""
    path = write_jsonl(tmp_path / "rows.jsonl", _rows())
    out = _embed(made.root, path, "--tokens-to-generate", "4")
    infer = cli("infer", path, "-p", made.root, "-q", "--tokens-to-generate", "4", "--mode", "generate")
    ok(infer)
    predictions = [json.loads(line)["prediction"] for line in infer.stdout.splitlines()]
    eos = made.tok.eos_token_id
    for row, prediction in zip(out, predictions):
        x = _vllm_decode(row["prompt_embeds"])[None]  # (1, N, H)
        with torch.inference_mode():
            new = made.model.generate(
                inputs_embeds=x,
                attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                max_new_tokens=row["max_tokens"],
                do_sample=False,
                pad_token_id=eos,
                eos_token_id=eos,
            )[0].tolist()
        new = new[: new.index(eos)] if eos in new else new
        assert made.tok.decode(new, skip_special_tokens=True).strip() == prediction, row["id"]


def test_dtype_follows_the_base(made, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", _rows()[:2])
    full, half = _embed(made.root, path), _embed(made.root, path, "--dtype", "bfloat16")
    for a, b in zip(full, half):
        x, y = _vllm_decode(a["prompt_embeds"]), _vllm_decode(b["prompt_embeds"])
        assert b["dtype"] == "bfloat16" and y.dtype == torch.bfloat16 and y.shape == x.shape
        assert torch.equal(y, x.bfloat16())  # the bf16 base's embeddings and the prompt cast to them


def test_what_no_input_can_carry_is_refused_by_name(made, tmp_path: Path) -> None:
    root = Path(shutil.copytree(made.root, tmp_path / "copy"))
    p = proj.load(root)
    bank.put(p, "late", torch.zeros(P, H), _record("prefix", prompt_layer=1))
    bank.put(p, "deep", torch.zeros(2 * P, H), PromptRecord(config=_record("prefix").config, depth=2))
    bank.put(p, "vote", torch.zeros(2, P, H), _record("prefix"))
    rows = [{"prompt_tag": t, "text": "i love it"} for t in ("pre", "late", "deep", "vote")]
    err = failed(cli("embed", write_jsonl(tmp_path / "bad.jsonl", rows), "-p", root), 2)
    for reason in (
        "cannot write vLLM's prompt_embeds",
        "'late' is a late prompt: it enters before block 1",
        "'deep' is a deep prompt (vectors for 2 blocks, entered as hidden states)",
        "'vote' is an ensemble of 2 prompts that answer by vote, and vLLM's prompt_embeds holds one prompt",
    ):
        assert reason in err, reason
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt_tag": "pre", "text": "i love it"}])
    assert "--tokens-to-generate must be at least 1" in failed(
        cli("embed", one, "-p", root, "--tokens-to-generate", "0"), 2
    )
    err = failed(cli("embed", one, "-p", root, "--tokens-to-generate", str(MAX_SEQ)), 2)
    assert "leave no room for text in 'pre'" in err
    nope = write_jsonl(tmp_path / "nope.jsonl", [{"prompt_tag": "nope", "text": "x"}])
    assert "unknown tag 'nope'" in failed(cli("embed", nope, "-p", root), 1)
    result = cli("embed", "-", "-p", root, "-q", input='{"prompt_tag": "pre", "text": "i love it"}\n')  # stdin
    ok(result)
    assert len(result.stdout.splitlines()) == 1
