"""The bank as a running server sees it: re-listed on every request, each file version loaded once.

Other ptcli commands tune, import, rename and remove tags while the server runs. They write
bank files by atomic rename, so a file is whole or absent; a new version is a new inode or
mtime. Listing the bank directory costs a few microseconds per file, so the server lists it
on every request (`bank.listing`, the rule `list-tags` uses) and loads only what changed,
through `bank.get` (checksum and base fingerprint checks). A file that fails them is not
served and the reason is kept, so a request for it gets the reason. Request fields never
name a file: a tag is looked up in what the listing found.
"""

from __future__ import annotations

from collections.abc import Callable

from ptcli.errors import CompatibilityError, ProjectError, ServeError, unknown_tags
from ptcli.inference.engine import Prompt
from ptcli.project import bank
from ptcli.project.manifest import ProjectDir

Version = tuple[int, int, int]  # inode, mtime in ns, size


class LiveBank:
    """`numpy`: prompts as numpy arrays (the llama.cpp engine's; loading them imports no torch)."""

    def __init__(self, project: ProjectDir, status: Callable[[str], None] = lambda _: None, numpy: bool = False):
        self.project, self.status, self.numpy = project, status, numpy
        self._served: dict[str, tuple[Version, Prompt]] = {}
        self._refused: dict[str, tuple[Version, str]] = {}

    def refresh(self) -> None:
        """Pick up added, replaced and removed files."""
        found = self._listing()
        for tag in [t for t in self._served if t not in found]:
            del self._served[tag]
            self.status(f"tag {tag!r} left the bank")
        self._refused = {t: r for t, r in self._refused.items() if t in found}
        for tag, version in found.items():
            if self._served.get(tag, (None,))[0] != version and self._refused.get(tag, (None,))[0] != version:
                self._load(tag, version)

    def tags(self) -> list[str]:
        return sorted(self._served)

    def prompt(self, tag: str) -> Prompt:
        """The served prompt of `tag`: 404 naming the known tags, or 409 with the reason a file was refused."""
        if tag in self._served:
            return self._served[tag][1]
        if tag in self._refused:
            raise ServeError(f"tag {tag!r} is in the bank but not served: {self._refused[tag][1]}", status=409)
        raise ServeError(
            unknown_tags([tag], self.tags()).message,
            status=404,
            extra={"known_tags": self.tags()},
        )

    def _listing(self) -> dict[str, Version]:
        return {tag: (st.st_ino, st.st_mtime_ns, st.st_size) for tag, st in bank.listing(self.project).items()}

    def _load(self, tag: str, version: Version) -> None:
        try:
            members, record = bank.get(self.project, tag, numpy=self.numpy)
        except (ProjectError, FileNotFoundError):  # gone since the listing; the next refresh drops it
            return
        except (CompatibilityError, OSError) as e:
            self._served.pop(tag, None)
            self._refused[tag] = (version, str(e))
            self.status(f"not serving tag {tag!r}: {e}")
            return
        self.status(f"serving tag {tag!r}" + (" (updated)" if tag in self._served else ""))
        self._served[tag] = (version, Prompt.of(tag, members, record))
