"""The choices ptcli offers, as str enums: a member equals the string users type and JSON stores.

So `cfg.init == Init.TEXT` holds for the plain string "text" read back from a manifest or a bank
record, and files written before the enums existed read the same. No torch here.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A str enum whose value is what users type and JSON stores (so `--mode rank` == Mode.RANK)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:  # f"{Mode.RANK}" is "rank" on every Python, as on 3.11's StrEnum
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Mode(Choice):
    """How a tag answers: greedy generation, or the likeliest answer of its answer set."""

    GENERATE = "generate"
    RANK = "rank"


class Init(Choice):
    TEXT = "text"
    LABELS = "labels"
    VOCAB = "vocab"
    RANDOM = "random"


class Reparam(Choice):
    NONE = "none"
    RESIDUAL = "residual"
    MLP = "mlp"
    LSTM = "lstm"


class Loss(Choice):
    """What a step minimises: the answer's LM loss (the seed's), or cross-entropy over the answer set's scores."""

    ANSWER = "answer"
    CHOICES = "choices"


class Format(Choice):
    """What `export` writes and `import` reads: ptcli's bank file, a PEFT prompt-tuning adapter folder, or a
    TensorRT-LLM prompt-table folder."""

    PTCLI = "ptcli"
    PEFT = "peft"
    TRTLLM = "trtllm"


class Dtype(Choice):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Backend(Choice):
    """What computes the answers of `infer` and `serve` (--engine)."""

    TORCH = "torch"
    LLAMACPP = "llama.cpp"


class LlamaWeights(Choice):
    """What weights --engine llama.cpp computes with (--llama-weights): the GGUF file's own types, or the file
    re-encoded once by llama.cpp's own quantizer (bf16: fastest where the CPU has AVX512-BF16; f32: closest to
    the torch path)."""

    FILE = "file"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    F32 = "f32"


class Tracker(Choice):
    """An experiment tracker of --log-with: the ones accelerate implements (`accelerate.utils.LoggerType`)."""

    TENSORBOARD = "tensorboard"
    WANDB = "wandb"
    MLFLOW = "mlflow"
    COMETML = "comet_ml"
    AIM = "aim"
    CLEARML = "clearml"
    DVCLIVE = "dvclive"
    SWANLAB = "swanlab"
    TRACKIO = "trackio"
