"""Reading repositories without checking them out: which commit a ref names, and a file's
text at a commit.

`git` runs with argument lists, never through a shell, with no terminal prompt and only
the git, http(s), ssh and file transports (`ext::` and friends would run commands). A ref
is resolved with `git ls-remote`; a file is read from a throw-away bare repository that
fetched just that commit, shallow and without file contents (`--filter=blob:none`, when
the server allows it), so reading a Dockerfile never downloads a monorepo: `git cat-file`
then fetches only the blob it needs. Every answer is kept for the life of the reader, and
concurrent asks for the same thing share one `git` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from buildfleet.rebuild.plan import SourceError

_T = TypeVar("_T")
_SHA: Final = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_ENV: Final = {
    "GIT_TERMINAL_PROMPT": "0",
    "GCM_INTERACTIVE": "never",
    "GIT_ALLOW_PROTOCOL": "git:http:https:ssh:file",
    "LC_ALL": "C",
}
MAX_FILE_BYTES: Final = 4 * 1024 * 1024


def check_url(url: str) -> None:
    """Refuse what git would read as an option, or as a transport that runs commands."""
    if not url or url.startswith("-") or any(ch in url for ch in "\n\r\0"):
        raise SourceError(f"{url!r} is not a repository URL")
    scheme, sep, _ = url.partition("://")
    if sep and scheme.lower() not in ("git", "http", "https", "ssh", "file"):
        raise SourceError(f"{url}: transport {scheme!r} is not allowed (git, http(s), ssh, file)")
    if not sep and "::" in url:
        raise SourceError(f"{url}: remote helpers (`transport::address`) are not allowed")


def _ref_candidates(ref: str) -> list[str]:
    if ref == "HEAD" or ref.startswith("refs/"):
        return [ref, f"{ref}^{{}}"]
    return [f"refs/heads/{ref}", f"refs/tags/{ref}", f"refs/tags/{ref}^{{}}"]


class GitReader:
    def __init__(self, workdir: Path, *, timeout_s: float = 120.0, parallel: int = 8) -> None:
        self.workdir = workdir
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(parallel)
        self._tasks: dict[tuple[str, ...], asyncio.Future[Any]] = {}  # answers of any type
        self._repo_locks: dict[str, asyncio.Lock] = {}
        """One git process at a time in a local copy: fetches share its shallow file and
        FETCH_HEAD, and reading a blob may fetch it."""

    async def _once(self, key: tuple[str, ...], make: Callable[[], Awaitable[_T]]) -> _T:
        """`make()` run once per key; later and concurrent callers share its answer."""
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = asyncio.ensure_future(make())
        return cast(_T, await asyncio.shield(task))

    async def _git(
        self, args: Sequence[str], *, cwd: Path | None = None, limit: int = MAX_FILE_BYTES
    ) -> tuple[int, bytes, str]:
        """(exit status, stdout up to `limit` bytes, stderr's last line)."""
        async with self._slots:
            process = await asyncio.create_subprocess_exec(
                "git", *args,
                cwd=cwd,
                env={**os.environ, **_ENV},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                async with asyncio.timeout(self.timeout_s):
                    assert process.stdout is not None
                    assert process.stderr is not None
                    out, err = await asyncio.gather(
                        process.stdout.read(limit + 1), process.stderr.read()
                    )
                    if len(out) > limit:
                        process.kill()
                    status = await process.wait()
            except TimeoutError:
                raise SourceError(f"git {args[0]} timed out after {self.timeout_s:.0f} s") from None
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
        if len(out) > limit:
            raise SourceError(f"larger than {limit >> 10} KiB")
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        return status, out, lines[-1].removeprefix("fatal: ") if lines else ""

    async def resolve(self, url: str, ref: str) -> str:
        """The commit `ref` (a branch, tag, `HEAD`, full ref name, or commit) names now."""
        check_url(url)
        if _SHA.match(ref):
            return ref
        return await self._once(("resolve", url, ref), lambda: self._resolve(url, ref))

    async def _resolve(self, url: str, ref: str) -> str:
        candidates = _ref_candidates(ref)
        status, out, err = await self._git(["ls-remote", "--end-of-options", url, *candidates])
        if status != 0:
            raise SourceError(f"{url}: {err or 'git ls-remote failed'}")
        found: dict[str, str] = {}
        for line in out.decode().splitlines():
            sha, _, name = line.partition("\t")
            found[name] = sha
        for name in candidates:
            # An annotated tag's peeled entry (`^{}`) names the commit it points at.
            if name in found:
                return found.get(f"{name}^{{}}", found[name])
        raise SourceError(f"{url}: no branch or tag named {ref!r}")

    async def branches(self, url: str) -> dict[str, str]:
        """Every branch of the repository and the commit it points at."""
        check_url(url)
        return await self._once(("branches", url), lambda: self._branches(url))

    async def _branches(self, url: str) -> dict[str, str]:
        status, out, err = await self._git(["ls-remote", "--heads", "--end-of-options", url])
        if status != 0:
            raise SourceError(f"{url}: {err or 'git ls-remote failed'}")
        heads: dict[str, str] = {}
        for line in out.decode().splitlines():
            sha, _, name = line.partition("\t")
            heads[name.removeprefix("refs/heads/")] = sha
        return heads

    async def read(self, url: str, commit: str, path: str, *, ref: str | None = None) -> str:
        """The text of `path` at `commit`; `ref` is fetched instead when the server refuses
        to serve a commit by its id (it must still name that commit)."""
        check_url(url)
        repo = await self._fetched(url, commit, ref)
        async with self._repo_locks[url]:
            status, out, _ = await self._git(["cat-file", "blob", f"{commit}:{path}"], cwd=repo)
        if status != 0:
            raise SourceError(f"{path}: not found at {commit[:12]} of {url}")
        try:
            return out.decode()
        except UnicodeDecodeError:
            raise SourceError(f"{path} at {commit[:12]} of {url}: not UTF-8 text") from None

    async def _fetched(self, url: str, commit: str, ref: str | None) -> Path:
        repo = await self._once(("repo", url), lambda: self._init(url))
        await self._once(("fetch", url, commit), lambda: self._fetch(repo, url, commit, ref))
        return repo

    async def _init(self, url: str) -> Path:
        self._repo_locks[url] = asyncio.Lock()
        repo = self.workdir / hashlib.sha256(url.encode()).hexdigest()[:16]
        for args in (
            ["init", "--quiet", "--bare", str(repo)],
            ["-C", str(repo), "config", "remote.origin.url", url],
            ["-C", str(repo), "config", "remote.origin.promisor", "true"],
            ["-C", str(repo), "config", "remote.origin.partialclonefilter", "blob:none"],
        ):
            status, _, err = await self._git(args)
            if status != 0:
                raise SourceError(f"{url}: cannot prepare a local copy ({err})")
        return repo

    async def _fetch(self, repo: Path, url: str, commit: str, ref: str | None) -> None:
        async with self._repo_locks[url]:
            await self._fetch_locked(repo, url, commit, ref)

    async def _fetch_locked(self, repo: Path, url: str, commit: str, ref: str | None) -> None:
        fetch = ["fetch", "--quiet", "--depth=1", "--filter=blob:none", "--no-tags", "origin"]
        status, _, err = await self._git([*fetch, commit], cwd=repo)
        if status == 0:
            return
        if ref is not None and not _SHA.match(ref):
            status, _, err = await self._git([*fetch, ref], cwd=repo)
            if status == 0:
                _, head, _ = await self._git(["rev-parse", "FETCH_HEAD"], cwd=repo)
                if head.decode().strip() == commit:
                    return
                raise SourceError(f"{url}: {ref} moved past {commit[:12]} while reading it")
        raise SourceError(f"{url}: cannot fetch {commit[:12]} ({err})")
