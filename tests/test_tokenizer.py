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
CONVERSATIONS = [
    [{"role": "user", "content": TEXTS[2]}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[0]}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "why?"}],
]
CHAT = (  # a template that reads special tokens and raises on a bad role, as templates on the Hub do
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}[{{ m['role'] }}] {{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
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
        for messages in CONVERSATIONS:
            for kw in ({"add_generation_prompt": True}, {}):
                assert ours.apply_chat_template(messages, tokenize=False, **kw) == theirs.apply_chat_template(
                    messages, tokenize=False, **kw
                )


def _tokenizer_with(source: Path, folder: Path, **config) -> None:
    """`source`'s tokenizer files in `folder`, `config` merged into its tokenizer_config.json."""
    for f in source.iterdir():
        if f.name.startswith("tokenizer"):
            (folder / f.name).write_bytes(f.read_bytes())
    merged = json.loads((folder / "tokenizer_config.json").read_text()) | config
    (folder / "tokenizer_config.json").write_text(json.dumps(merged))


def test_tiny_folders_tokenize_as_transformers_does(tiny_llama: Path) -> None:
    _same(tiny_llama)


@pytest.mark.slow
def test_the_default_base_tokenizes_as_transformers_does(default_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ptcli.lm.source import default_gguf, resolve

    monkeypatch.setenv("PTCLI_CACHE", str(default_cache))
    _same(Path(resolve("default", lambda _: None)))
    assert default_gguf().is_file()


def test_a_chat_template_renders_as_transformers_renders_it(tiny_llama: Path, tmp_path: Path) -> None:
    """Through transformers' jinja renderer, with the special tokens its tokenizer passes."""
    _tokenizer_with(tiny_llama, tmp_path, chat_template=CHAT)
    _same(tmp_path)
    with pytest.raises(Exception, match="bad role"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(ValueError, match="as text only"):
        load_tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[0], tokenize=True)


def test_a_folder_that_needs_transformers_gets_its_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    """WordPiece-style clean-up of spaces is transformers' own: such a folder is not read by `Tokenizer`."""
    _tokenizer_with(tiny_llama, tmp_path, clean_up_tokenization_spaces=True)
    tok = load_tokenizer(tmp_path)
    assert not isinstance(tok, Tokenizer)
    assert tok(TEXTS[0], add_special_tokens=False).input_ids == load_tokenizer(tiny_llama)(TEXTS[0]).input_ids
