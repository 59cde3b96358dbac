"""Tune prompts: check the run may start, read the data, load the base, run the recipe, write the results.

A run tunes one tag, or several tags over mixed batches (`--tag A --tag B`), each with
`--ensemble K` members; recipe.py holds the phases of the run itself. Here is what comes
before and after it: the preconditions (resume, overwrite), the shortcut of a finished
`--auto-resume`, and each tag's bank entry, run log and history line at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptcli.config import WATCHING, BaseOptions, TaskConfig, check_run_together, computed_settings
from ptcli.enums import Init
from ptcli.errors import ProjectError, WriteError
from ptcli.lm.base import load_project_base
from ptcli.project import bank, runs
from ptcli.project.manifest import ProjectDir, now
from ptcli.project.record import PromptRecord, kept_mode
from ptcli.tuning import checkpoint, trackers
from ptcli.tuning.recipe import Recipe, Reporter, setup
from ptcli.tuning.task import Splits, Task, make_tasks

__all__ = ["Reporter", "TuneResult", "tune_many"]


@dataclass
class TuneResult:
    tag: str
    steps: int
    best_step: int
    metrics: dict[str, float]
    initial_metrics: dict[str, float]
    seconds: float
    truncated: int
    path: str
    history: list[runs.HistoryRow] = field(default_factory=list)  # the run's steps and this tag's validations


def check_start(
    project: ProjectDir, cfgs: dict[str, TaskConfig], ckpt_path: Path, resume: bool | str, overwrite: bool
) -> bool:
    """Whether the run resumes. Refuses --resume with nothing to resume, and retuning a tag without --overwrite."""
    auto = resume == "auto"
    resuming = ckpt_path.exists() if auto else bool(resume)
    if resuming and not ckpt_path.exists():
        raise ProjectError(
            f"no interrupted run of {'+'.join(cfgs)!r} to resume ({ckpt_path} is missing)", hint="drop --resume"
        )
    for tag in cfgs:
        if bank.path_of(project, tag).exists() and not (resuming or overwrite or auto):
            raise ProjectError(
                f"tag {tag!r} already has a prompt in the bank",
                hint="pass --overwrite to retune it, or --resume to continue a killed run",
            )
    return resuming


def tune_many(
    project: ProjectDir,
    cfgs: dict[str, TaskConfig],
    reporter: Reporter,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    base: BaseOptions = BaseOptions(),
) -> list[TuneResult]:
    """Tune every tag of `cfgs` in one run. base.shard: FSDP-shard the frozen base over the processes.

    resume: True continues the interrupted run; "auto" does when there is one, starts afresh when there is
    none, and returns the bank's entries when this run already finished (same settings and data).
    """
    from accelerate import Accelerator

    check_run_together(cfgs)
    trackers.require(cfgs)
    # cpu=True: gloo when launched with several processes
    acc = Accelerator(cpu=not torch.cuda.is_available(), **trackers.accelerator_options(project, cfgs))
    ckpt_path = runs.checkpoint_path(project, list(cfgs))
    resuming = check_start(project, cfgs, ckpt_path, resume, overwrite)
    started = time.perf_counter()
    rows = Splits.read(cfgs)
    inputs = checkpoint.inputs_of(rows, base.dtype, project.base.fingerprint)
    if resume == "auto" and not resuming:
        done = finished(project, cfgs, inputs, overwrite)
        if done is not None:
            reporter.status(f"{'+'.join(cfgs)!r} is already tuned with these settings and data: nothing to do")
            return done
    model, tok = load_project_base(project.base, base, reporter.status)
    tasks = make_tasks(tok, cfgs, rows, project.num_prompt_tokens)
    truncated = sum(t.train.truncated + t.valid.truncated for t in tasks)
    if truncated:
        reporter.status(f"cut {truncated} long text(s) from the left to fit --max-seq-length")
    recipe = setup(
        project,
        tasks,
        (model, tok),
        acc,
        trackers.watched(reporter, acc, project, cfgs),
        ckpt_path=ckpt_path,
        inputs=inputs,
        resuming=resuming,
        shard_base=base.shard,
        started=started,
    )
    try:
        recipe.train()
    finally:
        recipe.close()
        trackers.finish(acc)
    return write_results(project, recipe)


def write_results(
    project: ProjectDir, recipe: Recipe, amend: Callable[[PromptRecord], PromptRecord] | None = None
) -> list[TuneResult]:
    """Each tag's best prompts into the bank with their record, its run log and history line; the checkpoint goes.

    amend: what a run other than tune's says in each record (distill's teacher)."""
    seconds = recipe.elapsed()
    state = recipe.state
    results = [
        TuneResult(
            tag=t.tag,
            steps=state.step,
            best_step=state.best_step[t.tag],
            metrics=state.best[t.tag],
            initial_metrics=state.initial[t.tag],
            seconds=seconds,
            truncated=t.train.truncated + t.valid.truncated,
            path=str(bank.path_of(project, t.tag)),
            history=[h for h in state.history if runs.belongs_to(h, t.tag)],
        )
        for t in recipe.tasks
    ]
    recipe.acc.wait_for_everyone()  # every process has finished training; the main one writes
    if recipe.acc.is_main_process:
        records = {t.tag: record_of(recipe, t, seconds) for t in recipe.tasks}
        save_run(project, recipe, {tag: amend(r) if amend else r for tag, r in records.items()})
    return results


def save_run(project: ProjectDir, recipe: Recipe, records: dict[str, PromptRecord]) -> None:
    """Write a finished run in an order where a failed write leaves a state every command describes alike.

    Before: the tags' settings in the manifest. The commit: each tag's prompt into the bank (the run's
    checkpoint, taken at its last step, stays until every tag is in). After: the checkpoint goes, then
    each tag's log and the history lines; a failure there is told as such, the prompts being saved.
    """
    state, done = recipe.state, []
    try:
        for t in recipe.tasks:
            project.tasks[t.tag] = t.cfg.to_dict()
        project.save()
        for t in recipe.tasks:
            assert state.best_prompt is not None  # a finished run holds its best prompts
            best = state.best_prompt[t.slots]  # (K, P, H)
            bank.put(project, t.tag, best[0] if len(t.slots) == 1 else best, records[t.tag])
            done.append(t.tag)
    except WriteError as e:
        left = [t.tag for t in recipe.tasks if t.tag not in done]
        saved = f"{_prompts(done)} saved; " if done else ""
        raise e.saying(
            f"{saved}{_prompts(left)} not saved (the bank keeps what it held); the run's checkpoint "
            f"at its last step ({state.step}) is kept",
            hint="free space, then run the same command with --resume: it writes the results without training again",
        ) from e
    recipe.ckpt_path.unlink(missing_ok=True)
    missed: list[tuple[WriteError, str]] = []
    for t in recipe.tasks:
        try:
            runs.write_log(project, t.tag, state.history)
        except WriteError as e:
            runs.log_path(project, t.tag).unlink(missing_ok=True)  # an earlier run's log must not pass for this one's
            missed.append((e, f"its log {runs.log_path(project, t.tag)}"))
    lines = [{"tag": tag, **{k: v for k, v in r.to_json().items() if k != "init_text"}} for tag, r in records.items()]
    try:
        runs.append_runs(project, lines)
    except WriteError as e:
        missed.append((e, f"the run's line{'s' * (len(lines) > 1)} in {e.path}"))
    if missed:
        first = missed[0][0]
        raise first.saying(
            f"{_prompts(done)} saved and ready, but {' and '.join(m for _, m in missed)} "
            f"{'were' if len(missed) > 1 else 'was'} not written",
            hint="the prompts need nothing more; free space before the next run",
        )


def _prompts(tags: list[str]) -> str:
    """'the prompt of 'a' is' or 'the prompts of 'a' and 'b' are'."""
    many = len(tags) > 1
    return f"the prompt{'s' * many} of {' and '.join(map(repr, tags))} {'are' if many else 'is'}"


def record_of(recipe: Recipe, t: Task, seconds: float) -> PromptRecord:
    """What the bank keeps about one tag's prompts: settings, metrics, data hashes, time (bank.put adds the base)."""
    state = recipe.state
    return PromptRecord(
        init=t.cfg.init,
        init_text=t.init_text if t.cfg.init == Init.TEXT else None,
        choices=t.choices,
        mode=kept_mode(t.choices),  # what `better` kept the prompt by; infer's default
        ensemble=len(t.slots),
        depth=recipe.depth,
        tuned_with=[o.tag for o in recipe.tasks if o.tag != t.tag],
        config=t.cfg.to_dict(),
        steps=state.step,
        best_step=state.best_step[t.tag],
        metrics=state.best[t.tag],
        initial_metrics=state.initial[t.tag],
        train_seconds=round(seconds, 2),
        world_size=recipe.acc.num_processes,
        inputs=recipe.inputs,
        created=state.started,
        updated=now(),
    )


def finished(
    project: ProjectDir, cfgs: dict[str, TaskConfig], inputs: dict[str, Any], overwrite: bool
) -> list[TuneResult] | None:
    """For --auto-resume without a checkpoint: every tag's result when the bank already holds this very run (same
    settings and inputs), None when the run is to start afresh; a tag tuned otherwise needs `overwrite`.

    A job killed after its last bank write, relaunched with the same command, then ends at once instead of failing.
    """
    done = []
    for tag, cfg in cfgs.items():
        path = bank.path_of(project, tag)
        record = bank.read_meta(project, tag).record if path.is_file() else None
        if (
            record is None
            or {k: v for k, v in record.config.items() if k not in WATCHING} != computed_settings(cfg)
            or record.inputs != inputs
            or record.tuned_with != [t for t in cfgs if t != tag]
        ):
            if not overwrite and any(bank.path_of(project, t).is_file() for t in cfgs):
                raise ProjectError(
                    f"{'+'.join(cfgs)!r} is already tuned, with other settings or data",
                    hint="pass --overwrite to retune",
                )
            return None
        done.append(
            TuneResult(
                tag,
                steps=record.steps or 0,
                best_step=record.best_step or 0,
                metrics=record.metrics,
                initial_metrics=record.initial_metrics,
                seconds=record.train_seconds or 0.0,
                truncated=0,
                path=str(path),
            )
        )
    return done
