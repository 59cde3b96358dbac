"""TaskConfig validation, flag precedence in merge_task, and tag checks (no torch needed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptcli.config import TaskConfig, check_prompt_length, check_tag, flag_of, merge_task
from ptcli.errors import UsageError


def _error(**kw) -> UsageError:
    with pytest.raises(UsageError) as info:
        TaskConfig(**kw)
    return info.value


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = TaskConfig(train="t.jsonl", valid="v.jsonl")
    assert TaskConfig.from_dict(cfg.to_dict()) == cfg


def test_every_field_names_its_flag() -> None:
    for f in dataclasses.fields(TaskConfig):
        assert flag_of(f.name) == "--" + f.name.replace("_", "-")


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"batch_size": 0}, "--batch-size"),
        ({"batch_size": -3}, "--batch-size"),
        ({"min_lr": 0.5, "lr": 0.1}, "--min-lr"),
        ({"min_lr": -1e-4}, "--min-lr"),
        ({"init": "zeros"}, "--init"),
        ({"lr": 0.0}, "--lr"),
        ({"max_seq_length": 0}, "--max-seq-length"),
        ({"val_check_interval": 0}, "--val-check-interval"),
        ({"warmup_steps": -1}, "--warmup-steps"),
        ({"constant_steps": -1}, "--constant-steps"),
        ({"max_steps": -1}, "--max-steps"),
        ({"init": "text", "init_text": "   "}, "--init-text"),
    ],
)
def test_bad_value_names_the_flag(kw, flag: str) -> None:
    e = _error(**kw)
    assert e.message.startswith(flag + " "), e.message
    assert e.exit_code == 2


def test_warmup_plus_constant_may_exceed_max_steps() -> None:
    """As in NeMo (and the README's Winogrande run), the run then ends before the decay starts."""
    cfg = TaskConfig(lr=2e-3, min_lr=2e-6, warmup_steps=320, constant_steps=2240, max_steps=1000)
    assert (cfg.warmup_steps, cfg.constant_steps, cfg.max_steps) == (320, 2240, 1000)


def test_all_problems_reported_in_one_error() -> None:
    e = _error(batch_size=0, min_lr=2.0, lr=1.0, init="bogus", max_steps=-1, seed=1)
    for flag in ("--batch-size", "--min-lr", "--init ", "--max-steps"):
        assert flag in e.message
    assert e.message.count(";") == 3  # four problems, one message


def test_from_dict_rejects_unknown_settings() -> None:
    with pytest.raises(UsageError, match="unknown task settings: bogus, zz"):
        TaskConfig.from_dict({"zz": 1, "bogus": 2})


def test_merge_given_flags_override_recorded() -> None:
    recorded = TaskConfig(train="old.jsonl", valid="v.jsonl", lr=0.1, min_lr=0.01, seed=7, answer_only=True).to_dict()
    cfg = merge_task(recorded, {"train": "new.jsonl", "lr": 0.5, "seed": None, "answer_only": False, "valid": None})
    assert cfg.train == str(Path("new.jsonl").resolve())  # given paths are recorded absolute
    assert cfg.valid == "v.jsonl"  # None: not given, recorded value kept
    assert cfg.lr == 0.5
    assert cfg.seed == 7
    assert cfg.answer_only is False  # False is a given value, not "absent"
    assert cfg.min_lr == 0.01


def test_merge_without_record_uses_defaults() -> None:
    cfg = merge_task(None, {"train": "t", "valid": "v", "batch_size": None})
    assert cfg == TaskConfig(train=str(Path("t").resolve()), valid=str(Path("v").resolve()))


def test_merge_validates_the_result() -> None:
    recorded = TaskConfig(train="t", valid="v", lr=0.1, min_lr=0.05).to_dict()
    with pytest.raises(UsageError, match="--min-lr"):
        merge_task(recorded, {"lr": 0.01})


@pytest.mark.parametrize(
    ("given", "missing"), [({}, "--train"), ({"train": "t"}, "--valid"), ({"valid": "v"}, "--train")]
)
def test_train_and_valid_required(given, missing: str) -> None:
    with pytest.raises(UsageError) as info:
        merge_task(None, given)
    assert info.value.message == f"{missing} is required (no recorded task gives it)"
    assert "ptcli add-task" in info.value.hint


_SETTINGS = {
    "lr": st.sampled_from([0.01, 0.1, 1.0]),
    "batch_size": st.integers(1, 64),
    "seed": st.integers(0, 10_000),
    "answer_only": st.booleans(),
    "max_steps": st.integers(50, 500),
}


@settings(max_examples=60, deadline=None)
@given(
    recorded=st.fixed_dictionaries({}, optional=_SETTINGS),
    flags=st.fixed_dictionaries({}, optional={k: st.none() | s for k, s in _SETTINGS.items()}),
)
def test_merge_precedence_property(recorded, flags) -> None:
    cfg = merge_task({"train": "t", "valid": "v", **recorded}, flags)
    default = TaskConfig()
    for name in _SETTINGS:
        if flags.get(name) is not None:
            expected = flags[name]
        elif name in recorded:
            expected = recorded[name]
        else:
            expected = getattr(default, name)
        assert getattr(cfg, name) == expected


@pytest.mark.parametrize("tag", ["a/b", "", "../x", ".hidden", "-x", "a b", "x" * 65, "a\\b", "é"])
def test_check_tag_rejects(tag: str) -> None:
    with pytest.raises(UsageError) as info:
        check_tag(tag)
    assert info.value.message.startswith(f"--tag {tag!r} is not a valid tag")


@pytest.mark.parametrize("tag", ["sent", "SST-2", "rte_v1.2", "0", "x" * 64])
def test_check_tag_accepts(tag: str) -> None:
    assert check_tag(tag) == tag


def test_check_tag_rejects_trailing_newline() -> None:
    with pytest.raises(UsageError):
        check_tag("sent\n")


def test_check_prompt_length() -> None:
    assert check_prompt_length(1) == 1 and check_prompt_length(4096) == 4096
    for n in (0, -1, 4097):
        with pytest.raises(UsageError, match="--num-prompt-tokens"):
            check_prompt_length(n)
