"""The architecture matrix: every model family ptcli is tested on, against a one-row, unpadded reference.

Each family is a tiny random model (2 layers, hidden 64, the tiny tokenizer) with weights at
std 0.2 so its answers depend on the whole context. Families with sliding-window attention
get a window of 8, shorter than every row here, so any pad between prompt and text would
change the answer. The reference is written here, apart from ptcli's code: one row at a time,
no padding, `model(inputs_embeds=[prompt][text][answer])`, logits everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from clihelp import cli, failed
from conftest import make_tokenizer
from reference import greedy

from ptcli.api import init_project
from ptcli.config import TaskConfig
from ptcli.data.encode import ANSWER_PREFIX
from ptcli.errors import ModelError
from ptcli.lm import forward
from ptcli.lm.arch import window_of
from ptcli.lm.base import load_base
from ptcli.lm.forward import IGNORE, choice_scores, token_logprobs
from ptcli.project import bank, peft_adapter
from ptcli.project.record import PromptRecord
from ptcli.tuning.tune import tune_many

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 8
P = 4
DENSE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)
GQA = dict(DENSE, num_key_value_heads=2)
# family: (config class, its settings); sliding-window families get WINDOW, with windowed layers switched on
FAMILIES = {
    "llama": ("LlamaConfig", GQA),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "qwen2": ("Qwen2Config", dict(GQA, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": (
        "Qwen3Config",
        dict(GQA, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=16, sliding_window=WINDOW)),
    "gemma3": (
        "Gemma3TextConfig",
        dict(GQA, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    ),
    "phi3": ("Phi3Config", dict(GQA, sliding_window=WINDOW)),
    "mistral": ("MistralConfig", dict(GQA, sliding_window=WINDOW)),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
        ),
    ),
    "gpt_neox": ("GPTNeoXConfig", DENSE),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4)),
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "starcoder2": ("Starcoder2Config", dict(GQA, sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", DENSE),
    "cohere2": (
        "Cohere2Config",
        dict(GQA, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    ),  # logit_scale
    "granite": ("GraniteConfig", dict(GQA, logits_scaling=4.0)),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            GQA,
            head_dim=16,
            sliding_window=WINDOW,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),  # attention sinks
    "mixtral": ("MixtralConfig", dict(GQA, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
}
PRESENT = [f for f, (cls, _) in FAMILIES.items() if hasattr(transformers, cls)]

TEXTS = [
    "i love it",
    "the food was terrible and i hated it , a negative review .",
    "sports news : the team won the game",
    "this phone is good , i like it . that one is bad , i dislike it . the movie was great",
]
ANSWERS = ["positive", "negative", "sports", "entailment"]
CHOICES = ["positive", "negative", "entailment"]  # "entailment" is several tokens
WHICH = [1, 0, 0, 1]  # two prompts in one batch: an ensemble, or two tags


# The fast loop (-m "not slow") checks these three: rotary with grouped queries, learned positions, and a
# sliding window; the full suite checks every family.
FAST = ("llama", "gpt2", "mistral")


@pytest.fixture(scope="module", params=[pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in PRESENT])
def family(request, tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_json: str):
    """(name, folder, model, tokenizer) of one family, built and loaded once per module."""
    path = tmp_path_factory.mktemp(request.param)
    return (request.param, path, *build(request.param, path, tiny_tokenizer_json))


def build(name: str, path: Path, tokenizer_json: str, **overrides):
    """A tiny random model of a family saved at `path` (with `overrides` of its settings), loaded as ptcli loads it."""
    cls, settings = FAMILIES[name]
    tok = make_tokenizer(tokenizer_json)
    config = getattr(transformers, cls)(
        **{**settings, **overrides},
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=None,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return load_base(str(path))


def _prompts(model, k: int = 2, n: int = P) -> torch.Tensor:
    H = model.get_input_embeddings().weight.shape[1]
    return torch.randn(k, n, H, generator=torch.Generator().manual_seed(0)) * 0.5  # (K, n, H)


def _answer_ids(tok, answer: str) -> list[int]:
    return tok(ANSWER_PREFIX + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]


def _reference_logprobs(model, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | prompt, ids[:i]) for every i, one unpadded row: (T,)."""
    x = torch.tensor([ids])  # (1, T)
    embeds = torch.cat([prompt.unsqueeze(0), model.get_input_embeddings()(x)], dim=1)  # (1, P+T, H)
    logits = model(inputs_embeds=embeds).logits[0, len(prompt) - 1 : -1].float()  # (T, V): slot j predicts token j+1
    return logits.log_softmax(-1).gather(1, x.T).squeeze(1)  # (T,)


def _reference_greedy(model, prompt: torch.Tensor, ids: list[int], eos: int, max_new: int) -> list[int]:
    out: list[int] = []
    for _ in range(max_new):
        x = torch.tensor([ids + out])
        embeds = torch.cat([prompt.unsqueeze(0), model.get_input_embeddings()(x)], dim=1)  # (1, P+T, H)
        nxt = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return out


def _crosses_the_window(model, rows: list[list[int]]) -> None:
    """The test is only worth its name if the padded rows are wider than the window and padded differently."""
    window = window_of(model)
    assert len({len(r) for r in rows}) > 1
    assert window is None or (window == WINDOW and P + max(map(len, rows)) > 2 * window)


def test_window_is_read_from_the_config(family) -> None:
    name, _, model, _ = family
    assert window_of(model) == (WINDOW if "sliding_window" in FAMILIES[name][1] else None)


@pytest.mark.parametrize("n", [P, 2 * WINDOW], ids=["short-prompt", "prompt-wider-than-window"])
def test_loss_and_gradient_equal_the_unpadded_reference(family, n: int) -> None:
    _, _, model, tok = family
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    seqs = [t + _answer_ids(tok, a) for t, a in zip(texts, ANSWERS)]
    labels = [[IGNORE] * len(t) + _answer_ids(tok, a) for t, a in zip(texts, ANSWERS)]
    _crosses_the_window(model, seqs)
    prompts = _prompts(model, n=n).requires_grad_()
    logp, row_of = token_logprobs(model, prompts, seqs, labels, tok.pad_token_id, which=WHICH)
    ours = torch.zeros(len(seqs)).index_add(0, row_of, logp)  # (B,)
    ours.sum().backward()
    ref_prompts = _prompts(model, n=n).requires_grad_()
    ref = torch.stack(
        [_reference_logprobs(model, ref_prompts[w], s)[len(t) :].sum() for w, s, t in zip(WHICH, seqs, texts)]
    )  # (B,)
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(prompts.grad, ref_prompts.grad, atol=1e-4, rtol=1e-3)


def _greedy_matches(model, tok, texts: list[list[int]], prompts: torch.Tensor, max_new: int) -> list[list[int]]:
    which = WHICH[: len(texts)]
    with torch.no_grad():
        ours = greedy(model, prompts, texts, tok.pad_token_id, tok.eos_token_id, max_new, which=which)
        ref = [_reference_greedy(model, prompts[w], t, tok.eos_token_id, max_new) for w, t in zip(which, texts)]
    assert ours == ref
    return ref


def _scores_match(model, tok, texts: list[list[int]], prompts: torch.Tensor, choices: list[str]) -> None:
    which, options = WHICH[: len(texts)], [_answer_ids(tok, c) for c in choices]
    with torch.no_grad():
        ours = choice_scores(model, prompts, texts, options, tok.pad_token_id, which)  # (B, C)
        ref = torch.tensor(
            [
                [_reference_logprobs(model, prompts[w], t + c)[len(t) :].sum().item() for c in options]
                for w, t in zip(which, texts)
            ]
        )  # (B, C)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [P, 2 * WINDOW], ids=["short-prompt", "prompt-wider-than-window"])
def test_greedy_answers_equal_the_unpadded_reference(family, n: int) -> None:
    _, _, model, tok = family
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    _crosses_the_window(model, texts)
    assert any(_greedy_matches(model, tok, texts, _prompts(model, n=n), 6))


@pytest.mark.parametrize("n", [P, 2 * WINDOW], ids=["short-prompt", "prompt-wider-than-window"])
def test_ranked_scores_equal_the_unpadded_reference(family, n: int) -> None:
    _, _, model, tok = family
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    _crosses_the_window(model, texts)
    _scores_match(model, tok, texts, _prompts(model, n=n), CHOICES)


def test_rows_that_fit_the_window_share_the_prompt(family, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the rule's edge (prompt + padded row + appended tokens == window) the fast path runs, and is exact."""
    _, _, model, tok = family
    texts = tok(["i", "i love it"], add_special_tokens=False).input_ids  # 1 and 3 tokens: two pads in the short row
    assert [len(t) for t in texts] == [1, 3] and all(
        len(c) == 2 for c in map(lambda a: _answer_ids(tok, a), ANSWERS[:2])
    )

    def pads_first(*args, **kwargs):
        raise AssertionError("the rows were read for a window they could cross")

    monkeypatch.setattr(forward, "pads_first", pads_first)
    prompts = _prompts(model, n=2)
    _greedy_matches(model, tok, texts, prompts, WINDOW - 2 - 3 + 1)  # decoding feeds all but the last new token
    _scores_match(model, tok, texts, prompts, ANSWERS[:2])


def test_peft_export_gives_the_reference_logits(family, tmp_path: Path) -> None:
    from peft import PeftModel

    _, path, model, tok = family
    project = init_project(tmp_path / "p", str(path), P)
    prompt = _prompts(model, 1)[0]  # (P, H)
    bank.put(project, "t", prompt, PromptRecord(config=TaskConfig().to_dict()))
    peft_adapter.export(project, "t", tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(load_base(str(path))[0], str(tmp_path / "adapter"))
    ids = tok(TEXTS[3], add_special_tokens=False).input_ids  # one unpadded row, longer than the window
    x = torch.tensor([ids])  # (1, T)
    with torch.no_grad():
        theirs = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, P:]  # (T, V)
        embeds = torch.cat([prompt.unsqueeze(0), model.get_input_embeddings()(x)], dim=1)  # (1, P+T, H)
        ref = model(inputs_embeds=embeds).logits[0, P:]  # (T, V)
    torch.testing.assert_close(theirs, ref, atol=1e-4, rtol=1e-4)


VALID = [
    ("i love it", "positive"),
    ("the food was terrible and i hated it , a negative review .", "negative"),
    ("this phone is good , i like it", "positive"),
    ("i hate it", "negative"),
    ("the movie was great and i loved it", "positive"),
]


def test_step0_validation_equals_the_unpadded_reference(family, tmp_path: Path) -> None:
    """A real `tune` (0 steps) of two tags at once.

    One is scored on the answer (its loss comes from ranking), one on text and answer.
    """
    _, path, model, tok = family
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt_tag": tag, "text": t, "answer": a}) + "\n" for tag in ("ans", "all") for t, a in VALID
        )
    )
    init_text = "is this review positive or negative"
    cfgs = {
        tag: TaskConfig(
            train=str(data), valid=str(data), init_text=init_text, answer_only=tag == "ans", max_steps=0, batch_size=8
        )
        for tag in ("ans", "all")
    }
    results = tune_many(init_project(tmp_path / "p", str(path), P), cfgs, _Quiet())
    ids = (tok(init_text, add_special_tokens=False).input_ids * P)[:P]
    prompt = model.get_input_embeddings().weight.detach()[ids]  # (P, H): the text init
    max_new = max(len(_answer_ids(tok, a)) for _, a in VALID)  # as validation decodes: the longest answer and eos
    with torch.no_grad():
        for result in results:
            nll, count, greedy_ok, rank_ok = 0.0, 0, 0, 0
            for text, answer in VALID:
                t = tok(text, add_special_tokens=False).input_ids
                logp = _reference_logprobs(model, prompt, t + _answer_ids(tok, answer))
                scored = logp[len(t) :] if result.tag == "ans" else logp
                nll, count = nll - scored.sum().item(), count + len(scored)
                out = tok.decode(_reference_greedy(model, prompt, t, tok.eos_token_id, max_new))
                greedy_ok += out.strip() == answer
                scores = [
                    _reference_logprobs(model, prompt, t + _answer_ids(tok, c))[len(t) :].sum()
                    for c in ("negative", "positive")
                ]
                rank_ok += ("negative", "positive")[int(torch.stack(scores).argmax())] == answer
            got = result.initial_metrics
            assert got["val_loss"] == pytest.approx(nll / count, abs=1e-4)
            assert got["val_acc_rank"] == rank_ok / len(VALID)
            assert got["val_acc"] == greedy_ok / len(VALID)


UNSUPPORTED = {  # model class: (its tiny config, what `ptcli init` says)
    "T5ForConditionalGeneration": (
        dict(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, decoder_start_token_id=0),
        "encoder-decoder",
    ),
    "BartForConditionalGeneration": (
        dict(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
        ),
        "encoder-decoder",
    ),  # loadable as BartForCausalLM
    "CpmAntForCausalLM": (
        dict(hidden_size=32, num_attention_heads=2, dim_head=16, dim_ff=64, num_hidden_layers=1),
        "does not accept inputs_embeds",
    ),
    "MambaForCausalLM": (
        dict(hidden_size=32, num_hidden_layers=1, state_size=4),
        "has recurrent layers (linear_attention)",
    ),
    "RwkvForCausalLM": (
        dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64),
        "cannot run",
    ),
}


@pytest.mark.parametrize("model_class", [m for m in UNSUPPORTED if hasattr(transformers, m)])
def test_init_refuses_what_cannot_take_a_soft_prompt(
    model_class: str, tmp_path: Path, tiny_tokenizer_json: str
) -> None:
    settings, says = UNSUPPORTED[model_class]
    cls = getattr(transformers, model_class)
    tok = make_tokenizer(tiny_tokenizer_json)
    cls(cls.config_class(vocab_size=len(tok), **settings)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    err = failed(cli("init", tmp_path / "p", "--base", tmp_path / "base"), 1)
    assert says in err and "hint: pick a" in err and "causal LM" in err
    assert not (tmp_path / "p").exists()


def test_init_refuses_a_base_the_batched_forward_gets_wrong(
    tmp_path: Path, tiny_tokenizer_json: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init's probe, on the bug it exists for.

    A window of 2, and the shared prefix forced on padded rows that cross it.
    """
    tok = make_tokenizer(tiny_tokenizer_json)
    cls, settings = FAMILIES["mistral"]
    config = getattr(transformers, cls)(
        **{**settings, "sliding_window": 2}, vocab_size=len(tok), eos_token_id=tok.eos_token_id, initializer_range=0.2
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    init_project(tmp_path / "ok", str(tmp_path / "base"), P)  # as ptcli runs it: exact
    monkeypatch.setattr(forward, "shared_prefix_exact", lambda model, width: True)
    with pytest.raises(ModelError, match="batched forward gives a loss of .* where one row at a time gives"):
        init_project(tmp_path / "p", str(tmp_path / "base"), P)


class _Quiet:
    def status(self, message: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, loss: float, lr: float, tokens: int) -> None: ...
    def evaluated(self, step: int, metrics: dict[str, float], tag: str | None = None) -> None: ...


# ---------------------------------------------------------------- templates: prompt vectors among the tokens

TEMPLATES = ["suffix", "{prompt:1}{text} so:{prompt}{answer}"]


def _slotted_logits(model, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Full logits (T, V) of one unpadded row whose prompt vector j is written -(j+1)."""
    E = model.get_input_embeddings()(
        torch.tensor([max(t, 0) for t in ids])
    )  # (T, H), scaled as the model scales its own (Gemma)
    return (
        model(inputs_embeds=torch.stack([prompt[-t - 1] if t < 0 else e for t, e in zip(ids, E)])[None])
        .logits[0]
        .float()
    )  # (T, V)


@pytest.mark.parametrize("template", TEMPLATES)
def test_templates_equal_the_unpadded_reference(family, template: str) -> None:
    """Loss, gradient, greedy answers and ranked scores of template rows.

    Two prompts in one batch, rows wider than the window.
    """
    from ptcli.data.template import Layout

    _, _, model, tok = family
    layout = Layout(tok, template, P)
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    rows = [layout.row(t, _answer_ids(tok, a), True) for t, a in zip(texts, ANSWERS)]  # (ids, labels, context)
    _crosses_the_window(model, [ids for ids, _, _ in rows])
    prompts = _prompts(model).requires_grad_()
    logp, row_of = token_logprobs(
        model, prompts, [r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id, which=WHICH
    )
    ours = torch.zeros(len(rows)).index_add(0, row_of, logp)  # (B,)
    ours.sum().backward()
    ref_prompts = _prompts(model).requires_grad_()
    ref = []
    for w, (ids, labels, _) in zip(WHICH, rows):
        logits = _slotted_logits(model, ref_prompts[w], ids)[:-1].log_softmax(-1)  # (T-1, V): position t predicts t+1
        keep = [t for t, lab in enumerate(labels[1:]) if lab != IGNORE]
        ref.append(logits[keep, [labels[t + 1] for t in keep]].sum())
    torch.stack(ref).sum().backward()
    torch.testing.assert_close(ours, torch.stack(ref).detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(prompts.grad, ref_prompts.grad, atol=1e-4, rtol=1e-3)
    contexts = [c for _, _, c in rows]
    options = [_answer_ids(tok, c) for c in CHOICES]
    with torch.no_grad():
        scores = choice_scores(model, prompts, contexts, options, tok.pad_token_id, WHICH)  # (B, C)
        got = greedy(model, prompts, contexts, tok.pad_token_id, tok.eos_token_id, 4, which=WHICH)
        for i, (w, c) in enumerate(zip(WHICH, contexts)):
            for j, o in enumerate(options):
                lp = _slotted_logits(model, prompts[w], c + o)[len(c) - 1 : -1].log_softmax(-1)  # (len(o), V)
                torch.testing.assert_close(
                    scores[i, j], lp[torch.arange(len(o)), torch.tensor(o)].sum(), atol=1e-4, rtol=0
                )
            out: list[int] = []
            for _ in range(4):
                nxt = int(_slotted_logits(model, prompts[w], c + out)[-1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
            assert got[i] == out
