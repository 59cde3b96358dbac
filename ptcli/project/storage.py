"""Durable file operations: atomic writes and the project lock.

Every file ptcli owns is written to a temporary file in the same directory, flushed,
fsynced, and renamed into place, so a crash or kill leaves either the old or the new file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ptcli.errors import ProjectError, write_failure

_UMASK = os.umask(0o022)  # reading the umask means setting it; put it straight back
os.umask(_UMASK)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_failure(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600; give it the mode the file had, or the one open() gives a new file
            os.fchmod(f.fileno(), stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_failure(path, e) from e
        raise
    _fsync_dir(path.parent)


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `folder` whole or not at all: into a temporary folder beside it first, then moved in
    (the folder renamed into place when it is new, each file renamed over its old one when it is not)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as e:
        raise write_failure(folder, e) from e
    name = ""
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        name = ""
        if folder.is_dir():
            for name in files:
                os.replace(tmp / name, folder / name)
            tmp.rmdir()
        else:
            os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; give it the mode mkdir gives a new folder
            os.rename(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_failure(folder / name, e) from e
        raise
    _fsync_dir(folder)
    _fsync_dir(folder.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def project_lock(root: Path, command: str) -> Iterator[None]:
    """Hold an exclusive lock on the project. The OS drops it when the process dies, even on SIGKILL."""
    lock_path = root / ".ptcli.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ProjectError(f"cannot open lock file {lock_path}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProjectError(
                f"project {root} is locked by {_holder(fd)}",
                hint="wait for that command to finish; two commands may not write one project at once",
            ) from None
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, and a contender is told "another process"
        clean_temp(root)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # unlocked, the file names nobody: an empty file means "holder still signing"
    finally:
        os.close(fd)


def temp_files(root: Path) -> list[Path]:
    """Temporary files of atomic writes in a project (root, bank/, runs/*/), hidden `.NAME.RANDOM.tmp`."""
    dirs = [root, root / "bank", *(root / "runs").glob("*")]
    return sorted(f for d in dirs if d.is_dir() for f in d.glob(".*.tmp") if f.is_file())


def clean_temp(root: Path) -> list[Path]:
    """Remove what killed writes left behind. Only called under the project lock: no writer is running."""
    removed = []
    for f in temp_files(root):
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass  # not ours to remove (permissions): `ptcli check` still reports it
    return removed


def _holder(fd: int) -> str:
    """The lock holder's own description. It writes it just after locking, so a contender may briefly see nothing."""
    for _ in range(50):
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.01)
    return "another process"


def is_main_process() -> bool:
    """True unless launched as a non-zero rank by accelerate/torchrun (checked without importing torch)."""
    return os.environ.get("RANK", "0") == "0"
