"""Typed settings for tuning and inference. Each field names the CLI flag that sets it,
so a bad value raises an error the user can act on. No torch import here: light commands use it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ptcli.enums import Backend, Dtype, Init, LlamaWeights, Loss, Reparam, Tracker
from ptcli.errors import UsageError

TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


@dataclass(frozen=True)
class BaseOptions:
    """How the frozen base is loaded and placed: one value from the CLI (or a library call) down to lm.base."""

    dtype: Dtype = Dtype.FLOAT32  # --dtype
    trust_remote_code: bool = False  # --trust-remote-code: the base's own Python code may run
    device_map: str | None = None  # --device-map (infer): accelerate's big-model placement, e.g. "auto"
    shard: bool = False  # --shard-base (tune): FSDP2 over the processes of a launched run
    engine: Backend = Backend.TORCH  # --engine (infer, serve): torch, or llama.cpp on the base's GGUF file
    llama_weights: LlamaWeights = LlamaWeights.FILE  # --llama-weights: the GGUF's own types, or a re-encoding

    def __post_init__(self) -> None:
        if self.llama_weights != LlamaWeights.FILE and self.engine != Backend.LLAMACPP:
            raise UsageError(f"--llama-weights {self.llama_weights} applies to --engine llama.cpp only")


def _setting(help: str, default: Any, **cli: Any) -> Any:
    """A TaskConfig field. Its flag is derived from its name (`flag_of`); `cli` holds what the option builder in
    cli/options.py needs beyond name, type and default: `choices` (an Enum), `off` (a bool's negative flag),
    `shown` (how --help states a default that is not a plain value), `required` (no default: the task must record it).
    """
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TaskConfig:
    """How one tag's prompt is tuned. Recorded in the project by `add-task` (or `tune`).

    Each field is the schema of one `add-task`/`tune` flag: name, type, default and help."""

    train: str = _setting("Training set, jsonl ({prompt_tag, text, answer}).", "", required=True)
    valid: str = _setting("Validation set, jsonl.", "", required=True)
    init: str = _setting(
        "Prompt init: text, labels (class-label embeddings, then sampled vocabulary), vocab (sampled vocabulary), "
        "or random.",
        "text",
        choices=Init,
    )
    init_text: str | None = _setting(
        "Init text: tokenized, tiled or clipped to the prompt length.", None, shown="the task's answers"
    )
    answer_only: bool = _setting("Loss on the answer only (else on text and answer).", True, off="--full-text-loss")
    batch_size: int = _setting("Global batch size.", 16)
    lr: float = _setting("Peak learning rate.", 0.1)  # best of 0.03 / 0.1 / 0.3 on SST-2 val (bench/sweep.py)
    min_lr: float = _setting("Learning rate reached at --max-steps (cosine decay).", 3e-4)
    warmup_steps: int = _setting("Linear warmup steps from 0 to --lr.", 10)
    constant_steps: int = _setting("Steps held at --lr after warmup, before decay.", 0)
    max_steps: int = _setting("Optimizer steps in total (0 stores the initial prompt).", 200)
    val_check_interval: int = _setting("Validate (and checkpoint) every N steps.", 50)
    max_seq_length: int = _setting("Max tokens per example, soft prompt included.", 512)
    seed: int = _setting("Random seed (init and data order).", 1234)
    group_by_length: bool = _setting(
        "Batch rows of similar length together (less padding); the batches still come in random order.", True
    )
    ensemble: int = _setting("Prompts trained for the tag (own data order each); infer combines them.", 1)
    template: str = _setting(
        "Where the prompt sits: prefix, suffix, or a template such as '{text}{prompt}{answer}' or "
        "'{prompt:10}{text} Answer:{prompt}{answer}' (slots add up to the prompt length).",
        "prefix",
    )
    reparam: str = _setting(
        "Train the prompt through an encoder, dropped after training: none, residual (P + MLP(P)), "
        "mlp or lstm (P-tuning).",
        "none",
        choices=Reparam,
    )
    reparam_lr: float = _setting("Peak learning rate of the --reparam encoder's weights.", 1e-3)
    prompt_layer: int = _setting(
        "Block the prompt enters before: 0 is the input (the seed's prompt); K > 0 a late prompt, whose rows' "
        "states below block K are computed once per run and take no gradient.",
        0,
    )
    deep: bool = _setting(
        "A deep prompt: every block from --prompt-layer up gets its own prompt vectors (P-tuning v2's deep "
        "prompts, entered as hidden states).",
        False,
    )
    loss: str = _setting(
        "What a step minimises: answer (LM loss of the gold answer) or choices (cross-entropy over the scores of "
        "the answer set, what --mode rank picks by; needs a closed answer set).",
        "answer",
        choices=Loss,
    )
    ema: float = _setting(
        "Validate and keep an exponential moving average of the prompt with this decay (e.g. 0.99) instead of the "
        "last step's prompt: it smooths the steps' noise out of the kept prompt. 0 keeps the last step's.",
        0.0,
    )
    max_minutes: float | None = _setting(
        "Stop training after this much wall time; the decay then runs over the time budget.", None, shown="no limit"
    )
    log_with: str | None = _setting(
        "Experiment trackers the run logs to through accelerate, comma-separated: "
        + ", ".join(t.value for t in Tracker)
        + " (settings once, then loss, lr and tokens/s per step, each tag's metrics per validation).",
        None,
        shown="none",
    )
    log_dir: str | None = _setting(
        "Where file-writing trackers (tensorboard, ...) log.", None, shown="the project's runs/trackers"
    )

    def __post_init__(self) -> None:
        problems = []
        for name, choices in (
            ("init", Init),
            ("reparam", Reparam),
            ("loss", Loss),
        ):  # the CLI checks these; a recorded file may not
            if getattr(self, name) not in {c.value for c in choices}:
                allowed = ", ".join(c.value for c in choices)
                problems.append(f"{flag_of(name)} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.init == Init.TEXT and self.init_text is not None and not self.init_text.strip():
            problems.append(f"{flag_of('init_text')} must not be empty")
        for name in ("batch_size", "max_seq_length", "val_check_interval", "ensemble"):
            if getattr(self, name) < 1:
                problems.append(f"{flag_of(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "constant_steps", "max_steps", "prompt_layer"):
            if getattr(self, name) < 0:
                problems.append(f"{flag_of(name)} must be 0 or more, got {getattr(self, name)}")
        for name in ("max_minutes", "reparam_lr", "lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                problems.append(f"{flag_of(name)} must be positive, got {getattr(self, name)}")
        if not 0 <= self.ema < 1:
            problems.append(f"{flag_of('ema')} must be 0 or more and below 1, got {self.ema}")
        if not 0 <= self.min_lr <= self.lr:
            problems.append(f"{flag_of('min_lr')} must be between 0 and {flag_of('lr')} ({self.lr}), got {self.min_lr}")
        unknown = [n for n in self.trackers() if n not in {t.value for t in Tracker}]
        if unknown:  # '' logs nowhere: it turns off a recorded tracker for one run
            allowed = ", ".join(t.value for t in Tracker)
            problems.append(f"{flag_of('log_with')} takes trackers among {allowed}, got {', '.join(unknown)}")
        if problems:
            raise UsageError("; ".join(problems))

    def trackers(self) -> list[str]:
        """The --log-with names, in order, each once."""
        return list(dict.fromkeys(n.strip() for n in (self.log_with or "").split(",") if n.strip()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown task settings: {', '.join(unknown)}")
        return cls(**data)


# What shapes the steps of a run: tags tuned together in one run must agree on these.
RUN_SETTINGS = (
    "batch_size",
    "lr",
    "min_lr",
    "warmup_steps",
    "constant_steps",
    "max_steps",
    "val_check_interval",
    "max_seq_length",
    "seed",
    "group_by_length",
    "ensemble",
    "max_minutes",
    "template",
    "reparam",
    "reparam_lr",
    "prompt_layer",
    "deep",
    "loss",
    "ema",
    "log_with",
    "log_dir",
)
# Where a run is watched from, not what it computes: a resumed or --auto-resume run may change them.
WATCHING = ("log_with", "log_dir")


def computed_settings(cfg: TaskConfig) -> dict[str, Any]:
    """The settings that shape a tag's prompt: all but WATCHING."""
    return {k: v for k, v in cfg.to_dict().items() if k not in WATCHING}


def check_run_together(cfgs: dict[str, TaskConfig]) -> None:
    """Several tags share one run's batches and schedule; their recorded settings must not pull apart."""
    first = next(iter(cfgs.values()))
    differ = [n for n in RUN_SETTINGS if any(getattr(c, n) != getattr(first, n) for c in cfgs.values())]
    if differ:
        values = "; ".join(
            f"{flag_of(n)}: " + ", ".join(f"{t}={getattr(c, n)}" for t, c in cfgs.items()) for n in differ
        )
        raise UsageError(
            f"tags tuned together must share their run settings ({values})", hint="pass those flags to set them for all"
        )


def flag_of(name: str) -> str:
    """The CLI flag that sets a TaskConfig field: derived from the field's name, so no flag is spelled twice."""
    return "--" + name.replace("_", "-")


def merge_task(recorded: dict[str, Any] | None, given: dict[str, Any]) -> TaskConfig:
    """Flags given on the command line override what `add-task` recorded; None means not given."""
    merged = dict(recorded or {})
    merged.update({k: v.value if isinstance(v, Enum) else v for k, v in given.items() if v is not None})
    for name in ("train", "valid", "log_dir"):  # recorded paths must still work from another directory
        value = given.get(name)
        if value and value != "-" and not value.startswith(("/dev/", "/proc/")):  # keep `<(cmd)` pipes as typed
            merged[name] = str(Path(value).expanduser().resolve())
    for name in ("train", "valid"):
        if not merged.get(name):
            raise UsageError(
                f"{flag_of(name)} is required (no recorded task gives it)", hint="pass it, or run `ptcli add-task`"
            )
    return TaskConfig.from_dict(merged)


def check_tag(tag: str) -> str:
    if not TAG_PATTERN.fullmatch(tag):
        raise UsageError(
            f"--tag {tag!r} is not a valid tag: use letters, digits, '_', '.', '-' "
            "(up to 64, starting with a letter or digit)"
        )
    return tag


def check_prompt_length(n: int) -> int:
    if not 1 <= n <= 4096:
        raise UsageError(f"--num-prompt-tokens must be between 1 and 4096, got {n}")
    return n


def check_tune_flags(
    length: int, num_prompt_tokens: int | None, devices: int, shard_base: bool, launched: bool
) -> None:
    """tune's flags that shape the run rather than a task; `length` is the project's prompt length."""
    if num_prompt_tokens is not None and num_prompt_tokens != length:
        raise UsageError(
            f"--num-prompt-tokens {num_prompt_tokens} differs from the project's {length}; "
            "one length serves every task",
            hint="drop the flag, or init a new project with the length you want",
        )
    if devices < 1:
        raise UsageError(f"--devices must be at least 1, got {devices}")
    if shard_base and devices < 2 and not launched:
        raise UsageError(
            "--shard-base shards over several processes: pass --devices 2 or more (or launch with accelerate/torchrun)"
        )


def check_infer_flags(
    devices: int, device_map: str | None, tokens_to_generate: int, batch_size: int, choices: str | None
) -> list[str] | None:
    """Refuse bad infer flags before the model loads, naming the flag.

    Returns the --choices answer set (None: each tag's own)."""
    if devices < 1 or (devices > 1 and device_map):
        raise UsageError(f"--devices must be at least 1 and cannot go with --device-map, got {devices}")
    if tokens_to_generate < 1:
        raise UsageError(f"--tokens-to-generate must be at least 1, got {tokens_to_generate}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    options = [c.strip() for c in choices.split(",") if c.strip()] if choices is not None else None
    if options is not None and len(options) < 2:
        raise UsageError(f"--choices needs at least two comma-separated answers, got {choices!r}")
    return options
