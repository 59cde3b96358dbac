"""Output: data goes to stdout as JSON; people get Rich on stderr (quiet when asked or not a terminal)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True, highlight=False)


def emit_json(obj: Any) -> None:
    with stdout_guard():
        sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
        sys.stdout.flush()


def emit_jsonl(rows: Iterable[dict[str, Any]]) -> None:
    with stdout_guard():
        out = sys.stdout
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()


@contextmanager
def stdout_guard() -> Iterator[None]:
    """A stdout that cannot take the data (`> out` on a full disk) ends in ptcli's error naming the file, not a
    traceback; what was not written is dropped (fd 1 goes to /dev/null), so the exit's own flush cannot fail too."""
    from ptcli.errors import write_failure

    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        try:
            target = os.readlink("/proc/self/fd/1")
        except OSError:
            target = "<stdout>"
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise write_failure(target, e).saying(
            "the output is incomplete (its last line may be cut)",
            hint="free space, then run the command again",
        ) from e


def say(message: str, quiet: bool = False, style: str | None = None) -> None:
    """A message for people; never parsed as markup (paths may hold brackets)."""
    if not quiet:
        err.print(message, markup=False, style=style, soft_wrap=True)


def show_error(message: str, problems: list[str], hint: str | None) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    for p in problems:
        err.print(f"  {p}", markup=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]hint:[/] {escape(hint)}", soft_wrap=True)


class TuneReporter:
    """Live progress for `tune` (step, loss, lr, tokens/s, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, tag: str, quiet: bool = False):
        self.tag, self.quiet = tag, quiet
        self.live = err.is_terminal and not quiet
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.last_eval = ""

    def status(self, message: str) -> None:
        say(message, self.quiet, style="dim")

    def start(self, total: int, done: int) -> None:
        self.t0 = time.perf_counter()
        if self.live and total > done:
            self.progress = Progress(
                TextColumn(f"[bold]{self.tag}[/]"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("tune", total=total, completed=done, info="")

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.tokens += tokens
        if self.progress is not None and self.task is not None:
            tps = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            info = f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s {self.last_eval}"
            self.progress.update(self.task, completed=step, info=info)
            if self.progress.finished:
                self.progress.stop()

    def evaluated(self, step: int, metrics: dict[str, float], tag: str | None = None) -> None:
        who = f"{tag} " if tag and tag != self.tag else ""  # several tags tuned together
        ranked = f" val_acc_rank {metrics['val_acc_rank']:.3f}" if "val_acc_rank" in metrics else ""
        self.last_eval = f"{who}val_acc {metrics['val_acc']:.3f}{ranked}"
        line = f"{who}step {step}: val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_acc']:.3f}{ranked}"
        if self.progress is not None:
            self.progress.console.print(line, markup=False)
        else:
            say(line, self.quiet)


def _distilled_row(d: dict[str, Any] | None) -> list[tuple[str, str]]:
    """`show`'s line for a prompt `ptcli distill` made: what its teacher was, and what its metrics mean."""
    if not d:
        return []
    return [
        (
            "distilled",
            f"from a {d.get('teacher_tokens')}-token text (sha256 {str(d.get('teacher_sha256'))[:12]}"
            + (f", its answers sampled at temperature {d['temperature']}" if d.get("temperature") else "")
            + f"), {d.get('tokens_saved_per_row')} tokens fewer a row; val_acc is agreement with the teacher's "
            "answers, val_loss the KL to it",
        )
    ]


def show_prompt(shown: Any) -> None:
    """`ptcli show` for people (stderr): the prompt's record as a table, then its curves as sparklines."""
    from rich.table import Table
    from rich.text import Text

    from ptcli.project.report import sparkline

    r = shown.record
    m, m0 = r.metrics or {}, r.initial_metrics or {}

    def metric(key: str, fmt: str) -> str:
        now = format(m[key], fmt) if key in m else "-"
        return f"{format(m0[key], fmt)} -> {now} (initial -> best)" if key in m0 else now

    table = Table("", "", title=f"prompt {shown.tag}", show_header=False, title_justify="left")
    rows = [
        ("base", f"{r.base_ref} (fingerprint {str(r.base_fingerprint)[:12]})"),
        ("prompt", f"{r.num_prompt_tokens} tokens x {r.hidden_size}"),
        ("init", str(r.init) + (f": {r.init_text!r}" if r.init_text else "")),
        ("mode", f"{r.answer_mode} (infer's default)"),
        ("steps", f"{r.steps} (best at step {r.best_step})" if r.steps is not None else "-"),
        ("val_acc", metric("val_acc", ".3f")),
        ("val_loss", metric("val_loss", ".4f")),
    ]
    if r.train_seconds is not None:
        rows.append(("trained", f"{r.train_seconds:.1f} s on {r.world_size or 1} process(es)"))
    if r.imported_from:
        rows.append(("imported from", str(r.imported_from.get("path"))))
    rows += _distilled_row(r.distilled)
    rows += [
        ("created", str(r.created)),
        ("updated", str(r.updated)),
        ("sha256", f"{str(r.sha256)[:16]}  {'ok' if shown.checksum_ok else 'MISMATCH: the file is damaged'}"),
    ]
    for k, v in rows:
        table.add_row(k, Text(v))
    if r.config:
        table.add_section()
        for k, v in r.config.items():
            table.add_row(k, Text(str(v)))
    err.print(table)

    c = shown.curves
    series = [
        ("loss", [x["loss"] for x in c.train], [x["step"] for x in c.train], ".4f"),
        ("val_loss", [x["val_loss"] for x in c.valid], [x["step"] for x in c.valid], ".4f"),
        ("val_acc", [x["val_acc"] for x in c.valid], [x["step"] for x in c.valid], ".3f"),
    ]
    if not c.train and len(c.valid) < 2:
        say(f"no curves: {c.source} does not exist or holds no steps (it is written when `ptcli tune` finishes)")
        return
    grid = Table.grid(padding=(0, 2))
    for name, values, steps, fmt in series:
        if values:
            span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
            grid.add_row(name, f"{format(values[0], fmt)} -> {format(values[-1], fmt)}", Text(sparkline(values)), span)
    err.print(f"curves ({escape(c.source)})", soft_wrap=True)
    err.print(grid)
    if c.skipped:
        say(f"skipped {c.skipped} unreadable line(s) in {c.source}", style="yellow")


def report_tuned(results: list, as_json: bool, quiet: bool, verb: str = "tuned") -> None:
    """The records on stdout (--json), and for people one line per tag: headline metric before -> after."""
    if as_json:
        records = [{k: v for k, v in dataclasses.asdict(r).items() if k != "history"} for r in results]
        emit_json(records[0] if len(records) == 1 else records)
    from ptcli.project.record import headline

    for r in results:
        m, m0 = r.metrics, r.initial_metrics
        key = headline(m)
        say(
            f"{verb} {r.tag!r}: {key} {m0.get(key, float('nan')):.3f} -> {m[key]:.3f} "
            f"(best at step {r.best_step} of {r.steps}), {r.seconds:.0f} s; saved {r.path}",
            quiet,
        )


def show_eval(result: dict[str, Any]) -> None:
    """lm-eval's metrics, a row per task and metric (`--json` puts the whole result on stdout instead)."""
    from rich.table import Table

    table = Table("task", "metric", "value", "stderr", "docs", title=f"lm-evaluation-harness: {result['tag']!r}")
    for task, metrics in sorted(result["results"].items()):
        docs = result["n_samples"].get(task, {}).get("effective", "")
        for key, value in sorted(metrics.items()):
            name, _, _ = key.partition(",")
            if name == "alias" or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            spread = metrics.get(key.replace(name, f"{name}_stderr", 1))
            table.add_row(task, name, f"{value:.4f}", f"{spread:.4f}" if isinstance(spread, float) else "-", str(docs))
    err.print(table)
