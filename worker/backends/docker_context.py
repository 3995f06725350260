"""A local build context as the Docker Engine wants it: a gzipped tar, `.dockerignore` applied.

`.dockerignore` follows Docker's rules (moby/patternmatcher): one pattern a line, `#`
comments, `!` re-includes, `*` and `?` within one path segment, `**` across segments, a
leading `/` ignored, the last matching pattern wins, and a pattern that matches a directory
matches everything under it. The Dockerfile and `.dockerignore` are always sent, as the
docker CLI does, so the daemon can read them.

The tar is gzipped: an uncompressed tar whose first member is a PAX header makes the
daemon's BuildKit read the whole upload as the Dockerfile. It is written by a thread into
a bounded queue that the request body reads, so a large context is never held in memory.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_CHUNK: Final = 64 * 1024
_QUEUE_CHUNKS: Final = 16
_PUT_WAIT_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class _Pattern:
    regex: re.Pattern[str]
    exclude: bool
    """False for a `!` pattern, which re-includes what it matches."""


def _translate(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated relative paths."""
    out: list[str] = []
    at = 0
    while at < len(pattern):
        char = pattern[at]
        if pattern.startswith("**", at):
            at += 2
            if pattern.startswith("/", at):  # `**/` also matches no directory at all
                at += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", at + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[at + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                at = end
        elif char == "\\" and at + 1 < len(pattern):
            at += 1
            out.append(re.escape(pattern[at]))
        else:
            out.append(re.escape(char))
        at += 1
    return re.compile("^" + "".join(out) + "$")


def _clean(pattern: str) -> str:
    cleaned = os.path.normpath(pattern).lstrip("/")
    return "" if cleaned == "." else cleaned


class DockerIgnore:
    """The patterns of one `.dockerignore`."""

    def __init__(self, lines: list[str]) -> None:
        self.patterns: list[_Pattern] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclude = not line.startswith("!")
            body = _clean(line if exclude else line[1:].strip())
            if body:
                self.patterns.append(_Pattern(_translate(body), exclude))
        self.has_exceptions = any(not p.exclude for p in self.patterns)

    @classmethod
    def of(cls, context: Path) -> DockerIgnore:
        try:
            return cls((context / ".dockerignore").read_text().splitlines())
        except FileNotFoundError:
            return cls([])

    def excluded(self, path: str) -> bool:
        """Whether `path` (relative, slash-separated) stays out of the context."""
        parents = [path]
        head = path
        while "/" in head:
            head = head.rsplit("/", 1)[0]
            parents.append(head)
        verdict = False
        for pattern in self.patterns:
            if any(pattern.regex.match(candidate) for candidate in parents):
                verdict = pattern.exclude
        return verdict


def context_members(context: Path, dockerfile: str) -> Iterator[tuple[Path, str]]:
    """(file on disk, name in the tar) for every entry that goes into the context."""
    ignore = DockerIgnore.of(context)
    always = {_clean(dockerfile), ".dockerignore"}
    for directory, dirs, files in os.walk(context):
        relative_dir = Path(directory).relative_to(context).as_posix()
        prefix = "" if relative_dir == "." else relative_dir + "/"
        kept_dirs = []
        for name in sorted(dirs):
            relative = prefix + name
            if (Path(directory) / name).is_symlink():
                if not ignore.excluded(relative):
                    yield Path(directory, name), relative
                continue
            if ignore.excluded(relative) and not ignore.has_exceptions:
                continue  # pruned: nothing below it can be re-included
            if not ignore.excluded(relative):
                yield Path(directory, name), relative
            kept_dirs.append(name)
        dirs[:] = kept_dirs
        for name in sorted(files):
            relative = prefix + name
            if not ignore.excluded(relative):
                yield Path(directory, name), relative
    for name in sorted(always):
        if ignore.excluded(name) and (context / name).is_file():
            yield context / name, name


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if not (info.isfile() or info.isdir() or info.issym() or info.islnk()):
        return None  # sockets, devices, fifos: nothing a build can use
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = int(info.mtime)
    return info


class _QueueWriter:
    """A file object whose writes become chunks in a bounded queue (for the request body)."""

    def __init__(self, chunks: queue.Queue[bytes | BaseException | None]) -> None:
        self.chunks = chunks
        self.stopped = threading.Event()
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) >= _CHUNK:
            self._put(bytes(self.buffer[:_CHUNK]))
            del self.buffer[:_CHUNK]
        return len(data)

    def flush_all(self) -> None:
        if self.buffer:
            self._put(bytes(self.buffer))
            self.buffer.clear()

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self.stopped.is_set():
            try:
                self.chunks.put(item, timeout=_PUT_WAIT_S)
                return
            except queue.Full:
                continue
        raise _Abandoned


class _Abandoned(Exception):
    """The reader went away (the build was cancelled): stop writing."""


def _write_tar(context: Path, dockerfile: str, writer: _QueueWriter) -> None:
    try:
        with tarfile.open(fileobj=writer, mode="w|gz", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for path, name in context_members(context, dockerfile):
                info = _normalised(tar.gettarinfo(str(path), arcname=name))
                if info is None:
                    continue
                if info.isfile():
                    with path.open("rb") as content:
                        tar.addfile(info, content)
                else:
                    tar.addfile(info)
        writer.flush_all()
        writer._put(None)
    except _Abandoned:
        return
    except BaseException as exc:
        try:
            writer._put(exc)
        except _Abandoned:
            return


def _next_chunk(
    chunks: queue.Queue[bytes | BaseException | None], stopped: threading.Event
) -> bytes | BaseException | None:
    """The next chunk; None at the end, or once the reader has gone (no thread is left
    blocked on the queue after a cancel)."""
    while not stopped.is_set():
        try:
            return chunks.get(timeout=_PUT_WAIT_S)
        except queue.Empty:
            continue
    return None


async def context_tarball(context: Path, dockerfile: str) -> AsyncIterator[bytes]:
    """The gzipped tar of `context`, in chunks, written by a thread as it is read."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=_QUEUE_CHUNKS)
    writer = _QueueWriter(chunks)
    thread = threading.Thread(
        target=_write_tar, args=(context, dockerfile, writer), name="docker-context", daemon=True
    )
    thread.start()
    try:
        while True:
            item = await asyncio.to_thread(_next_chunk, chunks, writer.stopped)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        writer.stopped.set()
