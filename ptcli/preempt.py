"""SIGTERM, as schedulers send it before they kill a job: note it, finish the current step, checkpoint, exit 75.

The handler only sets a flag; the tuning loop looks at it between steps (every process
agrees), so a signal never lands inside a write. `ptcli tune --auto-resume` then continues
from that checkpoint when the scheduler relaunches the same command.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ptcli.errors import PreemptedError

_requested = threading.Event()


def requested() -> bool:
    return _requested.is_set()


@contextmanager
def on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM sets the flag instead of ending the process (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    before = signal.signal(signal.SIGTERM, lambda *_: _requested.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        _requested.clear()


def stopped(where: str) -> PreemptedError:
    return PreemptedError(
        f"stopped by SIGTERM {where}", hint="run the same command with --auto-resume (or --resume) to continue"
    )
