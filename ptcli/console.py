"""Output: data goes to stdout as JSON; people get Rich on stderr (quiet when asked or not a terminal)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True, highlight=False)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def emit_jsonl(rows: list[dict[str, Any]]) -> None:
    out = sys.stdout
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.flush()


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
        self.task = None
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
        if self.progress is not None:
            tps = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            info = f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s {self.last_eval}"
            self.progress.update(self.task, completed=step, info=info)
            if self.progress.finished:
                self.progress.stop()

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.last_eval = f"val_acc {metrics['val_acc']:.3f}"
        line = f"step {step}: val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_acc']:.3f}"
        if self.progress is not None:
            self.progress.console.print(line, markup=False)
        else:
            say(line, self.quiet)
