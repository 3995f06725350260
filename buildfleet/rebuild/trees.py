"""Where a config's files are read from, and what source its artifacts are built from.

A Skaffold config on this machine is read from the filesystem and its artifacts are built
from local directories (a local fleet, a trusted producer); one named `URL#REF[:PATH]`
is read from the repository at the commit REF names now, and its artifacts are built from
that repository pinned to that commit, so every image of the batch comes from one commit.
"""

from __future__ import annotations

import asyncio
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from buildfleet.rebuild.gitread import MAX_FILE_BYTES, GitReader
from buildfleet.rebuild.plan import SourceError

DEFAULT_CONFIG: Final = "skaffold.yaml"


class Tree(Protocol):
    @property
    def commit(self) -> str | None:
        """The commit the tree is read at; None for files on this machine."""
        ...

    def join(self, directory: str, relative: str) -> str:
        """`relative` (from a file in `directory`) as a path of this tree."""
        ...

    def display(self, path: str) -> str:
        """How messages name a file of this tree."""
        ...

    async def read(self, path: str) -> str: ...

    def source(self, directory: str) -> tuple[dict[str, str], str]:
        """The request's `source` and `context` that build `directory` of this tree."""
        ...


@dataclass(frozen=True, slots=True)
class LocalTree:
    commit: str | None = None

    def join(self, directory: str, relative: str) -> str:
        return posixpath.normpath(posixpath.join(directory, relative))

    def display(self, path: str) -> str:
        return path

    async def read(self, path: str) -> str:
        return await asyncio.to_thread(self._read, path)

    @staticmethod
    def _read(path: str) -> str:
        file = Path(path)
        try:
            if file.stat().st_size > MAX_FILE_BYTES:
                raise SourceError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
            return file.read_text()
        except OSError as exc:
            raise SourceError(f"{path}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise SourceError(f"{path}: not UTF-8 text ({exc.reason})") from None

    def source(self, directory: str) -> tuple[dict[str, str], str]:
        return {"type": "local", "path": str(Path(directory).resolve())}, "."


@dataclass(frozen=True, slots=True)
class GitTree:
    reader: GitReader
    url: str
    ref: str
    commit: str

    def join(self, directory: str, relative: str) -> str:
        joined = posixpath.normpath(posixpath.join(directory, relative))
        if joined == ".." or joined.startswith("../") or posixpath.isabs(relative):
            raise SourceError(f"{self.display(relative)}: outside the repository")
        return joined

    def display(self, path: str) -> str:
        return f"{self.url}@{self.commit[:12]}:{path}"

    async def read(self, path: str) -> str:
        return await self.reader.read(self.url, self.commit, path, ref=self.ref)

    def source(self, directory: str) -> tuple[dict[str, str], str]:
        source = {"type": "git", "url": self.url, "ref": self.ref, "commit": self.commit}
        return source, directory or "."


async def open_git(reader: GitReader, url: str, ref: str) -> GitTree:
    return GitTree(reader, url, ref, await reader.resolve(url, ref))


def split_remote(location: str) -> tuple[str, str, str] | None:
    """`URL#REF[:PATH]` as (url, ref, path); None when `location` is not that form."""
    url, sep, fragment = location.partition("#")
    if not sep or ("://" not in url and "@" not in url):
        return None
    ref, _, path = fragment.partition(":")
    return url, ref or "HEAD", path or DEFAULT_CONFIG
