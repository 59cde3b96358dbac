"""The llama.cpp engine's tokenizer (tokenizer.json alone, no transformers) gives transformers' ids and texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ptcli.data.encode import answer_tokens
from ptcli.data.template import Layout
from ptcli.inference.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "the headset was not cheap at all, worth every penny.",
    "  leading spaces, trailing space ",
    "Ünïcödé – dashes — and emoji 🙂 and 中文",
    "tabs\tand\nnewlines\n\n",
    "<|im_end|> a special token typed as text",
    "",
]
TEMPLATE = "{prompt}<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n{answer}"


def _same(folder: Path) -> None:
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert isinstance(ours, Tokenizer)  # the folder needs nothing but tokenizer.json
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours(TEXTS).input_ids == theirs(TEXTS, add_special_tokens=False).input_ids
    assert ours(TEXTS[0]).input_ids == theirs(TEXTS[0], add_special_tokens=False).input_ids
    for ids in theirs(TEXTS, add_special_tokens=False).input_ids + [[theirs.eos_token_id, 5, theirs.eos_token_id]]:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert answer_tokens(ours, ["positive", "negative"]) == answer_tokens(theirs, ["positive", "negative"])
    text = theirs(TEXTS[0], add_special_tokens=False).input_ids
    assert Layout(ours, TEMPLATE, 4).context(text) == Layout(theirs, TEMPLATE, 4).context(text)
    assert bool(ours.chat_template) == bool(theirs.chat_template)
    if theirs.chat_template:  # the server renders conversations through it
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[0]}]
        kw = {"add_generation_prompt": True, "tokenize": False}
        assert ours.apply_chat_template(messages, **kw) == theirs.apply_chat_template(messages, **kw)


def test_tiny_folders_tokenize_as_transformers_does(tiny_llama: Path) -> None:
    _same(tiny_llama)


@pytest.mark.slow
def test_the_default_base_tokenizes_as_transformers_does(default_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ptcli.lm.source import default_gguf, resolve

    monkeypatch.setenv("PTCLI_CACHE", str(default_cache))
    _same(Path(resolve("default", lambda _: None)))
    assert default_gguf().is_file()


def test_a_folder_that_needs_transformers_gets_its_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    """WordPiece-style clean-up of spaces is transformers' own: such a folder is not read by `Tokenizer`."""
    for f in tiny_llama.iterdir():
        if f.name.startswith("tokenizer"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"clean_up_tokenization_spaces": True}))
    tok = load_tokenizer(tmp_path)
    assert not isinstance(tok, Tokenizer)
    assert tok(TEXTS[0], add_special_tokens=False).input_ids == load_tokenizer(tiny_llama)(TEXTS[0]).input_ids
