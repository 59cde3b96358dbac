"""Contextual calibration of ranked answers and the mode a prompt answers in by default, without a model."""

from __future__ import annotations

import pytest
import torch

from ptcli.lm.answers import calibrate, calibration_bias
from ptcli.project.record import PromptRecord


def test_a_strong_content_free_bias_changes_the_predictions() -> None:
    scores = torch.tensor([[-1.0, -2.0], [-1.5, -1.8], [-2.0, -1.0]])  # (B, C): uncalibrated picks 0, 0, 1
    free = torch.tensor([[0.0, -5.0]])  # (N, C): with no content the prompt all but says answer 0
    assert scores.argmax(-1).tolist() == [0, 0, 1]
    assert calibrate(scores, free).argmax(-1).tolist() == [1, 1, 1]


def test_uniform_content_free_scores_change_nothing() -> None:
    scores = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))  # (B, C)
    free = torch.full((2, 3), -4.0)  # (N, C): no answer favoured
    out = calibrate(scores, free)
    assert out.argmax(-1).tolist() == scores.argmax(-1).tolist()
    assert torch.allclose(out - scores, torch.full_like(scores, torch.log(torch.tensor(3.0)).item()))


def test_the_bias_averages_the_content_free_distributions_per_member() -> None:
    free = torch.log(torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]))  # (N=2, K=2, C=2)
    bias = calibration_bias(free)  # (K, C)
    assert torch.allclose(bias.exp(), torch.tensor([[0.7, 0.3], [0.5, 0.5]]))
    scores = torch.zeros(4, 2, 2)  # (B, K, C): broadcast over rows
    assert calibrate(scores, free).shape == (4, 2, 2)


@pytest.mark.parametrize(
    "record, mode",
    [
        ({"mode": "generate", "choices": ["a", "b"]}, "generate"),  # recorded: as validation chose it
        ({"choices": ["a", "b"]}, "rank"),  # older records: validation ranked whenever there was an answer set
        ({"choices": None}, "generate"),
        ({}, "generate"),  # e.g. an imported PEFT adapter
    ],
)
def test_mode_of_a_record(record: dict, mode: str) -> None:
    assert PromptRecord.from_json(record).answer_mode == mode


def test_a_replaced_prompt_takes_its_calibration_with_it(lively_llama) -> None:
    """The engine keeps a calibration bias per prompt object, weakly: a prompt the bank replaced (a reloaded
    tag) gets a bias of its own, never one of a freed object, and the old one's bias goes with it."""
    import gc

    from ptcli.config import TaskConfig
    from ptcli.inference.engine import Engine, Item, Prompt
    from ptcli.lm.base import load_base
    from ptcli.project.record import PromptRecord

    model, tok = load_base(str(lively_llama))
    engine = Engine(model, tok)
    record = PromptRecord(config={**TaskConfig().to_dict(), "max_seq_length": 64}, mode="rank", init="random")
    H = model.get_input_embeddings().weight.shape[1]
    biases = []
    for seed in (0, 1):
        prompt = Prompt.of("t", torch.randn(4, H, generator=torch.Generator().manual_seed(seed)), record)
        biases.append(engine._bias(Item(prompt, "x", "rank", 0, ("good", "bad"), True)))
        assert len(engine._biases) == 1  # the first prompt is gone: so is its bias
        del prompt
        gc.collect()
    assert len(engine._biases) == 0
    assert not torch.equal(biases[0], biases[1])


def test_the_engine_remembers_a_bounded_number_of_answer_sets(lively_llama, monkeypatch) -> None:
    """A server's clients may send any --choices: the engine keeps the room of the newest MAX_ROOMS sets only."""
    from ptcli.config import TaskConfig
    from ptcli.inference import engine as eng
    from ptcli.inference.engine import Engine, Item, Prompt
    from ptcli.lm.base import load_base
    from ptcli.project.record import PromptRecord

    monkeypatch.setattr(eng, "MAX_ROOMS", 3)
    model, tok = load_base(str(lively_llama))
    e = Engine(model, tok)
    record = PromptRecord(config={**TaskConfig().to_dict(), "max_seq_length": 64}, mode="rank", init="random")
    prompt = Prompt.of("t", torch.zeros(4, model.get_input_embeddings().weight.shape[1]), record)
    for i in range(5):
        assert isinstance(e.rows([Item(prompt, "x", "rank", 0, (f"yes{i}", "no"))])[0], list)
    assert [k[2] for k in e._rooms] == [("yes2", "no"), ("yes3", "no"), ("yes4", "no")]
