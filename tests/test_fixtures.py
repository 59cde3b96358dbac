"""Sanity checks for the shared fixtures in conftest.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_tiny_model_loads_and_runs(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    assert tokenizer.pad_token is None
    assert tokenizer.eos_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id

    ids = tokenizer("the answer is positive", return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("word", [" positive", " negative", " sports", " food", " science", " True", " False"])
def test_leading_space_round_trips(tiny_tokenizer, word: str) -> None:
    ids = tiny_tokenizer.encode(word, add_special_tokens=False)
    assert ids and tiny_tokenizer.eos_token_id not in ids
    assert tiny_tokenizer.decode(ids) == word


def test_tokenizer_adds_no_special_tokens(tiny_tokenizer) -> None:
    assert tiny_tokenizer.bos_token is None and tiny_tokenizer.unk_token is None
    assert tiny_tokenizer.encode("i love it") == tiny_tokenizer.encode("i love it", add_special_tokens=False)


def test_env_is_isolated_and_offline(_isolated_env) -> None:
    assert os.environ["PTCLI_CACHE"] == str(_isolated_env)
    assert _isolated_env.is_dir()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_tiny_data(tiny_data) -> None:
    train = [json.loads(line) for line in tiny_data.train.read_text().splitlines()]
    valid = [json.loads(line) for line in tiny_data.valid.read_text().splitlines()]
    assert (len(train), len(valid)) == (40, 10)
    for rows in (train, valid):
        assert {r["prompt_tag"] for r in rows} == {"sent"}
        assert sum(r["answer"] == "positive" for r in rows) == len(rows) // 2
        assert all(set(r) == {"prompt_tag", "text", "answer"} for r in rows)
    assert not {r["text"] for r in train} & {r["text"] for r in valid}
