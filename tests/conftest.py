"""Shared pytest fixtures: tiny random causal LMs on disk, offline env, toy data.

Tests must never download weights (the real default model is only used by tests
marked ``slow``), so the models here are built from configs with random weights
and a byte-level BPE tokenizer trained in a fraction of a second on the small
corpus below. The tokenizer mimics the awkward parts of real base models on
purpose: it has an EOS token but no pad, BOS or UNK token. With ~400 tokens,
frequent corpus words with a leading space (" positive", " sports", " True")
are single tokens while other words split into several (" entailment" is six),
so ptcli's padding and single/multi-token answer code paths get exercised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

EOS = "<|endoftext|>"
TOKENIZER_VOCAB_SIZE = 400

# Enough English for BPE merges that cover the labels and common words used in tests.
_CORPUS = [
    "the movie was great and i loved it , a positive review .",
    "the food was terrible and i hated it , a negative review .",
    "this phone is good , i like it . that one is bad , i dislike it .",
    "answer : positive . answer : negative . label : positive negative",
    "sports news : the team won the game on saturday night .",
    "food news : a new restaurant opened downtown with fresh bread .",
    "science news : researchers discovered a new planet this week .",
    "topic : sports food science . sports , food , science .",
    "is it true ? True . is it false ? False . True or False ?",
    "the question is whether the premise entails the hypothesis . yes no",
    "review : it is not bad at all but the service was slow .",
    "sentence : i love it . i hate it . i really like this . i do not like that .",
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the city.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 and punctuation , . ! ? : ; ' \" ( )",
]


def _train_tokenizer_json() -> str:
    """Train the tiny byte-level BPE tokenizer; return it serialized (immutable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def make_tokenizer(tokenizer_json: str):
    """Wrap serialized ``tokenizers`` JSON as a fresh ``PreTrainedTokenizerFast``.

    ``pad_token``, ``bos_token`` and ``unk_token`` stay unset on purpose, like
    many decoder-only base models.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        eos_token=EOS,
        bos_token=None,
        unk_token=None,
        pad_token=None,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer_json() -> str:
    """The trained tokenizer as JSON, trained once per session."""
    return _train_tokenizer_json()


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_json: str):
    """A fresh ``PreTrainedTokenizerFast`` per test, so tests may mutate it freely."""
    return make_tokenizer(tiny_tokenizer_json)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_json: str) -> Path:
    """Directory holding a random 2-layer Llama (GQA, tied embeddings) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(tiny_tokenizer_json)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_json: str) -> Path:
    """Directory holding a random 2-layer GPT-2 (learned positions) and its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer(tiny_tokenizer_json)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,  # GPT-2 convention: BOS == EOS id
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point ptcli's state at a fresh temp dir and forbid Hub network access."""
    cache = tmp_path_factory.mktemp("ptcli_cache")
    monkeypatch.setenv("PTCLI_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once at import; patch the live value too.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@dataclass(frozen=True)
class TinyData:
    """Paths of a toy two-answer data set for tag ``sent``."""

    train: Path
    valid: Path
    tag: str = "sent"
    answers: tuple[str, ...] = ("positive", "negative")


_POS_VERBS = ["love", "like", "enjoy", "adore", "really like"]
_NEG_VERBS = ["hate", "dislike", "loathe", "really hate", "can't stand"]
_OBJECTS = ["it", "this", "the movie", "the food", "the phone"]


@pytest.fixture
def tiny_data(tmp_path: Path) -> TinyData:
    """``train.jsonl`` (40 rows) and ``valid.jsonl`` (10 rows), balanced, no shared text."""
    pos = [f"i {v} {o}" for v in _POS_VERBS for o in _OBJECTS]  # 25 texts
    neg = [f"i {v} {o}" for v in _NEG_VERBS for o in _OBJECTS]  # 25 texts
    rows = []
    for p, n in zip(pos, neg):  # alternate answers so every prefix stays balanced
        rows.append({"prompt_tag": "sent", "text": p, "answer": "positive"})
        rows.append({"prompt_tag": "sent", "text": n, "answer": "negative"})
    data = TinyData(train=tmp_path / "train.jsonl", valid=tmp_path / "valid.jsonl")
    for path, part in ((data.train, rows[:40]), (data.valid, rows[40:])):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return data


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: uses the real default base model (needs it cached locally)")
    config.addinivalue_line("markers", "multiproc: launches several processes (accelerate / torchrun)")
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device (skipped without one; scripts/gpu_check.sh runs them)"
    )


def _lively_copy(src: Path, dest: Path) -> Path:
    """The model at ``src`` re-drawn with weights at std 0.2 instead of 0.02, tokenizer alongside."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def lively_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama`` with larger random weights.

    At the default init (std 0.02) a tiny model just echoes the last input token, whatever
    the soft prompt is; at std 0.2 its greedy output depends on the prompt and the whole
    context, so tests can tell one prompt's predictions from another's.
    """
    return _lively_copy(tiny_llama, tmp_path_factory.mktemp("lively_llama"))


@pytest.fixture(scope="session")
def lively_gpt2(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_gpt2`` with larger random weights (see ``lively_llama``)."""
    return _lively_copy(tiny_gpt2, tmp_path_factory.mktemp("lively_gpt2"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's torch work on one thread (use: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    Tiny models gain nothing from intra-op threads, and on a busy machine the thread pool's
    hand-offs cost milliseconds per matmul: one thread makes the tiny-model tests ~50x faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ptcli cache per session for the real default model: its GGUF is converted once, not per test."""
    return tmp_path_factory.mktemp("ptcli-default-cache")


@pytest.fixture(scope="session")
def llama(lively_llama):
    """(model, tokenizer) of ``lively_llama``, loaded once."""
    from ptcli.lm.base import load_base

    return load_base(str(lively_llama))


@pytest.fixture(scope="session")
def gpt2(lively_gpt2):
    """(model, tokenizer) of ``lively_gpt2``, loaded once."""
    from ptcli.lm.base import load_base

    return load_base(str(lively_gpt2))


@pytest.fixture(params=["llama", "gpt2"])
def base(request):
    """Each of the two tiny architectures in turn."""
    return request.getfixturevalue(request.param)
