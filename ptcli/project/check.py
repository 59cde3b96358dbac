"""`ptcli check`: verify a whole project without loading the model (no torch).

What it reads: the manifest; every bank file (structure, sha256, base and prompt length, the
tag in its header); every run's checkpoint (structure and sha256) and metrics log; the run
history. A problem is something a command would refuse or lose; a note is harmless
(a resumable run, temp files of killed writes, which the next writing command removes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ptcli.errors import CompatibilityError, PtcliError
from ptcli.project import bank, runs
from ptcli.project import manifest as proj
from ptcli.project.storage import temp_files


@dataclass
class Finding:
    path: str
    message: str


@dataclass
class Report:
    project: str
    checked: dict[str, int] = field(default_factory=dict)  # how many of each kind of file were read
    problems: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": not self.problems}


def check(start: Path | None = None) -> Report:
    """Every problem in the project at or above `start`; raises only when there is no project at all."""
    root = proj.find_root(start)
    report = Report(str(root))
    p = _manifest(root, report)
    _bank(root, p, report)
    _runs(root, report)
    for f in temp_files(root):
        report.notes.append(
            Finding(str(f), "temporary file of an interrupted write; the next writing command removes it")
        )
    return report


def _manifest(root: Path, report: Report) -> proj.ProjectDir | None:
    report.checked["manifest"] = 1
    try:
        return proj.load(root)
    except PtcliError as e:
        report.problems.append(Finding(str(root / proj.MANIFEST), e.message))
        return None


def _bank(root: Path, p: proj.ProjectDir | None, report: Report) -> None:
    files = sorted((root / "bank").glob(f"*{bank.SUFFIX}"))
    report.checked["prompts"] = len(files)
    for path in files:
        if path.name.startswith("."):
            continue
        try:
            if not path.is_file():
                raise CompatibilityError(f"{path} is not a regular file")
            _, _, record = bank.verify(str(path), path.read_bytes())
            if p is not None:
                bank.check_compatible(p, record, f"prompt {path}")
            if record.tag != path.name[: -len(bank.SUFFIX)]:
                raise CompatibilityError(f"{path} holds the prompt of tag {record.tag!r}")
        except PtcliError as e:
            report.problems.append(Finding(str(path), e.message))
        except OSError as e:
            report.problems.append(Finding(str(path), f"cannot read it: {e.strerror}"))


def _runs(root: Path, report: Report) -> None:
    ckpts = sorted((root / "runs").glob("*/checkpoint.safetensors"))
    logs = sorted((root / "runs").glob("*/metrics.jsonl"))
    history = root / "runs" / "history.jsonl"
    report.checked.update(checkpoints=len(ckpts), logs=len(logs) + history.is_file())
    for path in ckpts:
        try:
            record = runs.verify_checkpoint(path)
            report.notes.append(
                Finding(
                    str(path),
                    f"an interrupted run of {'+'.join(record.get('config', {}))} at step "
                    f"{record.get('step')}; `ptcli tune ... --auto-resume` continues it",
                )
            )
        except PtcliError as e:
            report.problems.append(Finding(str(path), e.message))
    for path in [*logs, *([history] if history.is_file() else [])]:
        bad = _bad_lines(path)
        if bad:
            report.problems.append(Finding(str(path), f"{len(bad)} unreadable line(s): {', '.join(map(str, bad[:5]))}"))


def _bad_lines(path: Path) -> list[int]:
    bad = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(n)
        except ValueError:
            bad.append(n)
    return bad
