"""ptcli as a Python library. `ptcli tune` and `ptcli infer` are clients of these calls.

    from ptcli.api import Project

    project = Project.open("myproj")
    project.tune("reviews", train="train.jsonl", valid="valid.jsonl", max_steps=50)
    rows = project.infer([{"prompt_tag": "reviews", "text": "a delight"}]).rows

Importing this module is cheap: torch and transformers load only when a call needs them.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptcli.config import BaseOptions, TaskConfig, merge_task
from ptcli.data.template import parse as parse_template
from ptcli.errors import ProjectError
from ptcli.project import bank
from ptcli.project import manifest as proj
from ptcli.project.record import PromptRecord
from ptcli.project.storage import is_main_process, project_lock

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch

    from ptcli.inference.infer import InferResult
    from ptcli.tuning.tune import Reporter, TuneResult


class Silent:
    """A Reporter that says nothing: the default for library calls (the CLI passes its progress bar)."""

    def status(self, message: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, loss: float, lr: float, tokens: int) -> None: ...
    def evaluated(self, step: int, metrics: dict[str, float], tag: str | None = None) -> None: ...


class Project:
    """A project as a library user holds it: its base model reference, its recorded tasks and its prompt bank.

    `dir` is the manifest's ProjectDir, which the modules below take."""

    def __init__(self, directory: proj.ProjectDir):
        self.dir = directory

    @classmethod
    def open(cls, path: str | Path | None = None) -> Project:
        """The project at `path`, or the nearest one at or above the current directory (as the CLI finds it)."""
        return cls(proj.load(Path(path) if path is not None else None))

    @property
    def root(self) -> Path:
        return self.dir.root

    def tags(self) -> list[str]:
        """The tags in the bank, sorted."""
        return bank.tags(self.dir)

    def record(self, tag: str) -> PromptRecord:
        """A prompt's settings, metrics and base, read from its bank header (no torch)."""
        bank.require(self.dir, tag)
        return bank.read_meta(self.dir, tag).record

    def prompt(self, tag: str) -> torch.Tensor:
        """A prompt (P, H), or an ensemble's (K, P, H), after its checksum and base checks."""
        return bank.get(self.dir, tag)[0]

    def task_configs(self, tags: list[str], settings: dict[str, Any]) -> dict[str, TaskConfig]:
        """Each tag's settings: what `add-task` recorded, overridden by `settings` (TaskConfig fields).

        A setting that is None is not given. A bad value or template is refused here, naming the flag.
        """
        cfgs = {t: merge_task(self.dir.tasks.get(t), settings) for t in tags}
        for cfg in cfgs.values():
            parse_template(cfg.template, self.dir.num_prompt_tokens)
        return cfgs

    def tune(
        self,
        tags: str | list[str],
        *,
        reporter: Reporter | None = None,
        resume: bool | str = False,
        overwrite: bool = False,
        base: BaseOptions = BaseOptions(),
        **settings: Any,
    ) -> list[TuneResult]:
        """Tune one tag, or several together over mixed batches; one TuneResult per tag, in order.

        settings: TaskConfig fields (train, valid, lr, max_steps, ...) over the recorded task's. resume: True or
        "auto" (see tuning.tune.tune_many). Holds the project lock, as every command that writes the project does.
        """
        from ptcli.tuning.tune import tune_many

        tags = [tags] if isinstance(tags, str) else list(tags)
        cfgs = self.task_configs(tags, settings)
        holder = f"ptcli tune --tag {' --tag '.join(tags)}"
        with project_lock(self.root, holder) if is_main_process() else nullcontext():  # one process writes
            return tune_many(
                self.dir,
                cfgs,
                reporter or Silent(),
                resume=resume,
                overwrite=overwrite,
                base=base,
            )

    def distill(
        self,
        tag: str,
        teacher: str,
        inputs: str | Path,
        *,
        valid: str | Path | None = None,
        max_new_tokens: int = 16,
        top_k: int = 64,
        temperature: float = 0.0,
        reporter: Reporter | None = None,
        resume: bool | str = False,
        overwrite: bool = False,
        base: BaseOptions = BaseOptions(),
        **settings: Any,
    ) -> TuneResult:
        """Distill the `teacher` text into `tag`'s soft prompt from unlabelled `inputs` (jsonl: prompt_tag, text).

        valid: held-out inputs (default: the last tenth of `inputs`, at most 200 rows). temperature > 0 samples the
        teacher's answers on the training inputs (validation stays greedy). settings: TaskConfig fields
        (lr, max_steps, template, ...) over the recorded task's. See tuning/distill.py.
        """
        from ptcli.tuning.distill import Teaching, distill

        teaching = Teaching(teacher, max_new_tokens, top_k, temperature)
        cfg = self.task_configs([tag], {**settings, "train": str(inputs), "valid": str(valid or inputs)})[tag]
        with project_lock(self.root, f"ptcli distill --tag {tag}") if is_main_process() else nullcontext():
            return distill(
                self.dir, tag, cfg, teaching, reporter or Silent(), resume=resume, overwrite=overwrite, base=base
            )

    def infer(self, source: str | Path | Iterable[dict[str, Any]], **options: Any) -> InferResult:
        """Answers for rows given as dicts ({"prompt_tag", "text"[, "answer"], ...}) or a jsonl path ('-': stdin).

        options: those of infer.infer (mode, choices, calibrated, tokens_to_generate, batch_size, base, ...).
        The rows come back in input order, each with `prediction` added, exactly as `ptcli infer` writes them.
        """
        from ptcli.inference.infer import infer

        return infer(self.dir, source, **options)


def init_project(
    root: Path, base: str | None, num_prompt_tokens: int, trust_remote_code: bool = False, status=lambda _: None
) -> proj.ProjectDir:
    """Create a project: load the base once to record its fingerprint and hidden size."""
    from ptcli.lm.base import fingerprint, load_base
    from ptcli.lm.probe import check_supported
    from ptcli.lm.source import canonical_ref, check_base_flag

    if (root / proj.MANIFEST).exists():
        raise ProjectError(f"{root} is already a ptcli project", hint="use it as is, or pick another directory")
    check_base_flag(base)
    ref = canonical_ref(base)
    model, _ = load_base(ref, BaseOptions(trust_remote_code=trust_remote_code), status)
    check_supported(model, ref)
    info = proj.BaseInfo(
        ref=ref,
        fingerprint=fingerprint(model),
        hidden_size=int(model.get_input_embeddings().weight.shape[1]),
        model_type=str(model.config.model_type),
    )
    return proj.create(root, info, num_prompt_tokens)
