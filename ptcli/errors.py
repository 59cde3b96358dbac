"""One error family for ptcli. The CLI turns these into exit codes; nothing else does.

Exit codes: 0 ok, 1 failure (runtime, compatibility, project state), 2 bad usage or bad input,
75 stopped by SIGTERM after a checkpoint (EX_TEMPFAIL: relaunch the same command to resume).
"""

from __future__ import annotations

import errno


class PtcliError(Exception):
    """Base of every error ptcli raises on purpose. `hint` says what to run next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(PtcliError):
    """A flag or setting has a bad value; the message names the flag."""

    exit_code = 2


class InputError(PtcliError):
    """A data file is missing or malformed; `problems` holds `file:line: message` lines."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.problems = problems or []


class ProjectError(PtcliError):
    """The project directory is missing, locked, or in a state that forbids the command."""


class WriteError(ProjectError):
    """A file could not be written (a full disk, a quota, a read-only file system, permissions).

    The message is `REASON: PATH; OUTCOME`: what failed, then what was and was not saved.
    """

    def __init__(self, reason: str, path: object, outcome: str = "nothing was changed", hint: str | None = None):
        super().__init__(
            f"{reason}: {path}; {outcome}", hint or "free space or fix permissions, then run the command again"
        )
        self.reason, self.path = reason, str(path)

    def saying(self, outcome: str, hint: str | None = None) -> WriteError:
        """The same failure, told with what the caller knows was and was not saved."""
        return WriteError(self.reason, self.path, outcome, hint or self.hint)


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def write_failure(path: object, e: OSError) -> WriteError:
    """The one way a failed write is reported: `no space left on device: PATH; nothing was changed`."""
    return WriteError(_REASONS.get(e.errno or 0, (e.strerror or str(e)).lower()), path)


class CompatibilityError(PtcliError):
    """A prompt or project was made for another base model, or a file failed its checksum."""


class ModelError(PtcliError):
    """The base model cannot be found or loaded."""


class ServeError(PtcliError):
    """A request the server refuses. `status` is its HTTP status; `extra` goes into the JSON error body."""

    def __init__(
        self, message: str, status: int = 400, *, headers: dict[str, str] | None = None, extra: dict | None = None
    ):
        super().__init__(message)
        self.status, self.headers, self.extra = status, headers or {}, extra or {}


class PreemptedError(PtcliError):
    """SIGTERM stopped a run after it wrote a checkpoint; the same command with --auto-resume continues it."""

    exit_code = 75  # sysexits' EX_TEMPFAIL: a temporary failure, try again


def unknown_tags(unknown: list[str], known: list[str]) -> ProjectError:
    """The one refusal of tags a project does not have: which ones, which it has, and how to see or add them."""
    names = ", ".join(map(repr, unknown))
    return ProjectError(
        f"unknown tag{'s' if len(unknown) > 1 else ''} {names}; known tags: {', '.join(known) or 'none yet'}",
        hint="`ptcli list-tags` shows the bank; `ptcli tune --tag TAG` tunes a new prompt",
    )
