"""Whole-tag operations on a project's bank: remove, rename, export and import a prompt.

None of these loads the model or imports torch: a prompt moves as the bytes of its
safetensors file, checked (structure, checksum, base) and re-labelled by `bank`. Commands
that write the project hold its lock, and every file is written atomically. A tag's pieces
are its prompt (`bank/TAG.safetensors`), its run history (`runs/TAG/`) and its recorded
task settings (the manifest's `tasks`); remove and rename treat them together.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ptcli.config import check_tag
from ptcli.errors import InputError, ProjectError, UsageError, WriteError, unknown_tags
from ptcli.project import bank
from ptcli.project import manifest as proj
from ptcli.project.manifest import ProjectDir
from ptcli.project.storage import atomic_write, project_lock, write_folder


@dataclass
class Removed:
    tag: str
    removed: list[str]  # paths deleted
    task_record: bool  # whether the recorded settings were dropped


@dataclass
class Renamed:
    old: str
    new: str
    path: str
    moved: list[str] = field(default_factory=list)  # what else followed the tag: run history, task record


@dataclass
class Exported:
    tag: str
    format: str
    path: str
    files: list[str]


@dataclass
class Imported:
    tag: str
    format: str
    source: str
    path: str
    warnings: list[str] = field(default_factory=list)


def _unknown(p: ProjectDir, tag: str) -> ProjectError:
    """A tag is known here by its prompt or by its recorded settings: either can be removed or renamed."""
    return unknown_tags([tag], sorted(set(bank.tags(p)) | set(p.tasks)))


def remove_tag(project: ProjectDir, tag: str, keep_task: bool = False) -> Removed:
    """Delete a tag's prompt and run history, and (unless keep_task) its recorded settings."""
    check_tag(tag)  # a tag is a file name: never let one reach outside bank/ and runs/
    with project_lock(project.root, f"ptcli remove-tag {tag}"):
        p = proj.load(project.root)
        prompt, runs = bank.path_of(p, tag), p.run_dir(tag)
        if not prompt.exists() and not runs.exists() and tag not in p.tasks:
            raise _unknown(p, tag)
        dropped = tag in p.tasks and not keep_task
        if dropped:  # first: the one write that needs space, so a full disk stops the command before it removes
            del p.tasks[tag]
            p.save()
        removed = []
        if prompt.exists():
            prompt.unlink()
            removed.append(str(prompt))
        if runs.exists():
            shutil.rmtree(runs)
            removed.append(str(runs))
        return Removed(tag, removed, dropped)


def rename_tag(project: ProjectDir, old: str, new: str) -> Renamed:
    """Give a tag's prompt, run history and recorded settings a new name.

    The prompt is rewritten (atomically) with the new tag in its header before the old file
    goes, so a crash part-way leaves the prompt under both names, never under neither.
    """
    check_tag(old)
    check_tag(new)
    if new == old:
        raise UsageError(f"the new tag is the old one ({old!r})")
    with project_lock(project.root, f"ptcli rename-tag {old} {new}"):
        p = proj.load(project.root)
        src, dst = bank.path_of(p, old), bank.path_of(p, new)
        if not src.exists() and old not in p.tasks:
            raise _unknown(p, old)
        taken = [str(x) for x in (dst, p.run_dir(new)) if x.exists()] + (
            [f"the recorded task {new!r} in {p.root / proj.MANIFEST}"] if new in p.tasks else []
        )
        if taken:
            raise ProjectError(
                f"tag {new!r} already exists ({'; '.join(taken)})",
                hint=f"pick another name, or `ptcli remove-tag {new}` first",
            )
        moved = []
        if src.exists():
            atomic_write(dst, bank.relabel(str(src), src.read_bytes(), new))
        if old in p.tasks:
            p.tasks[new] = p.tasks.pop(old)
            try:
                p.save()
            except WriteError:
                dst.unlink(missing_ok=True)  # back to the old name only: the message's "nothing was changed" holds
                raise
            moved.append("task record")
        if p.run_dir(old).exists():
            os.replace(p.run_dir(old), p.run_dir(new))
            moved.append(str(p.run_dir(new)))
        src.unlink(missing_ok=True)
        return Renamed(old, new, str(dst) if dst.exists() else "", moved)


def export_bytes(project: ProjectDir, tag: str) -> bytes:
    """A tag's bank file, verified, exactly as stored (it describes itself: settings, metrics, base, checksum)."""
    blob, _ = bank.read_verified(project, check_tag(tag))
    return blob


def export_file(project: ProjectDir, tag: str, out: Path, force: bool = False) -> Exported:
    """Copy a tag's bank file to `out`: a file, or a folder that gets TAG.safetensors and a model card (README.md)."""
    from ptcli.project.card import card

    blob, record = bank.read_verified(project, check_tag(tag))
    if not out.is_dir():
        if out.exists() and not force:
            raise UsageError(f"{out} already exists", hint="pass --force to overwrite it, or choose another path")
        atomic_write(out, blob)
        return Exported(tag, "ptcli", str(out), [str(out)])
    files = {
        f"{tag}{bank.SUFFIX}": blob,
        "README.md": card(project, record, "ptcli", str(out / f"{tag}{bank.SUFFIX}")).encode(),
    }
    taken = [str(out / n) for n in files if (out / n).exists()]
    if taken and not force:
        raise UsageError(
            f"{', '.join(taken)} already exist(s)", hint="pass --force to overwrite, or choose another path"
        )
    write_folder(out, files)
    return Exported(tag, "ptcli", str(out / f"{tag}{bank.SUFFIX}"), [str(out / n) for n in files])


def read_source(source: str) -> tuple[str, bytes]:
    """(name for messages, bytes) of a prompt file to import; '-' reads stdin."""
    if source == "-":
        return "<stdin>", sys.stdin.buffer.read()
    path = Path(source)
    if not path.is_file():
        raise InputError(
            f"{source} does not exist" if not path.exists() else f"{source} is not a file",
            hint="pass a file made by `ptcli export`",
        )
    return source, path.read_bytes()


def import_bytes(project: ProjectDir, name: str, blob: bytes, tag: str | None = None) -> Imported:
    """Add a prompt exported by ptcli to the bank, under its own tag or `tag`.

    Refused when the file is damaged, made for another base or prompt length (the message
    names both bases), or when the tag is already in the bank.
    """
    _, _, record = bank.verify(name, blob)
    bank.check_compatible(project, record, name)
    new = tag or record.tag
    if not new:
        raise UsageError(f"{name} names no tag: import it with --tag")
    with new_tag_slot(project, new, name) as p:
        target = bank.path_of(p, new)
        atomic_write(target, bank.relabel(name, blob, new))
    return Imported(new, "ptcli", name, str(target))


@contextmanager
def new_tag_slot(project: ProjectDir, tag: object, source: str) -> Iterator[ProjectDir]:
    """Hold the project lock for an import under `tag`; yield the project as it is now.

    Refused when there is no usable tag or the tag is already in the bank.
    """
    if not isinstance(tag, str):
        raise UsageError(f"--tag is required: {source} records no tag")
    check_tag(tag)
    with project_lock(project.root, f"ptcli import {source}"):
        p = proj.load(project.root)
        if bank.path_of(p, tag).exists():
            raise ProjectError(
                f"tag {tag!r} is already in the bank",
                hint=f"import under another name with --tag NEW, or `ptcli remove-tag {tag}` first",
            )
        yield p
