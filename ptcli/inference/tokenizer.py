"""The base's tokenizer for the llama.cpp engine, read from the converted copy's tokenizer.json alone.

`transformers` imports torch (about 250 MB of a process that needs neither: llama.cpp computes,
numpy holds the prompts). The fast tokenizer transformers wraps is this same `tokenizers` object, so
the ids are the ones the torch path reads (tests compare them). A folder whose tokenizer needs more
than encode and decode (no tokenizer.json, or the space clean-up of WordPiece-style decoders) gets
transformers' tokenizer instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class Encoded:
    input_ids: list  # list[int] for one text, list[list[int]] for several


class Tokenizer:
    """What ptcli's engines call on a tokenizer: tok(texts, add_special_tokens=False).input_ids, decode, eos.

    A chat template (the server's /v1/chat/completions) is rendered by transformers' own jinja renderer,
    `transformers.utils.chat_template_utils`, which imports neither torch nor the tokenizer classes (about
    40 MB): jinja templates are transformers' dialect, not re-implemented here. The template sees the special
    tokens as transformers' tokenizer passes them (`special_tokens_map`)."""

    def __init__(self, backend, eos_token_id: int, chat_template: str | None, special: dict[str, Any]):
        self._backend = backend  # tokenizers.Tokenizer
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self._special = special

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False):
        """The conversation rendered as text (the server's call, `tokenize=False`)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        if tokenize:
            raise ValueError("the llama.cpp engine's tokenizer renders chat templates as text only (tokenize=False)")
        out: Any = render_jinja_template(  # (the rendered conversations, generation indices); annotated `str`
            conversations=[messages],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **self._special,
        )
        return out[0][0]

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> Encoded:
        if isinstance(text, str):
            return Encoded(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return Encoded([e.ids for e in self._backend.encode_batch(list(text), add_special_tokens=add_special_tokens)])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(folder: Path):
    """The folder's tokenizer: `Tokenizer` over tokenizer.json where that is all it is, else transformers'."""
    from tokenizers import Tokenizer as Backend

    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    plain = not config.get("clean_up_tokenization_spaces")  # transformers' WordPiece-style clean-up is its own
    if (folder / "tokenizer.json").is_file() and isinstance(eos, str) and plain:
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        eos_id = backend.token_to_id(eos)
        template = folder / "chat_template.jinja"
        chat = template.read_text(encoding="utf-8") if template.is_file() else config.get("chat_template")
        if eos_id is not None:
            return Tokenizer(backend, eos_id, chat, special_tokens(config))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def special_tokens(config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json's special tokens as transformers' `special_tokens_map` gives them: content strings."""

    def content(token):
        return token.get("content") if isinstance(token, dict) else token

    found: dict[str, Any] = {k: content(config[k]) for k in SPECIAL if config.get(k) is not None}
    extra = [content(t) for t in config.get("additional_special_tokens") or []]
    return found | ({"additional_special_tokens": extra} if extra else {})
