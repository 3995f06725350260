"""A jib build's own copy of its source, in the attempt's scratch directory.

Maven writes `target/` into the project it builds, so the build never runs in a directory
it shares: a git source is fetched (one commit, shallow when the request names a ref), a
local one copied. The project's pom.xml must resolve inside that copy (a symlinked module
pointing out of it is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Final

from producer.contract import BuildRequest, GitSource, JibRecipe, LocalSource
from worker.errors import PermanentBuildError
from worker.retry import classify
from worker.subprocesses import spawn

_GIT_ENV: Final = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ALLOW_PROTOCOL": "git:http:https:ssh",  # never file:// or ext:: from a request
    "GIT_CONFIG_NOSYSTEM": "1",
}


async def checkout(git: str, request: BuildRequest, recipe: JibRecipe, scratch: Path) -> Path:
    """The project directory (the module's) in a fresh copy of the request's source."""
    tree = scratch / "source"
    match request.source:
        case GitSource(url=url, commit=commit, ref=ref):
            await _fetch(git, url, commit or ref, tree, full=commit is not None)
        case LocalSource(path=path):
            await asyncio.to_thread(_copy, Path(path), tree)
    return await asyncio.to_thread(_project, tree, request, recipe)


def _copy(origin: Path, tree: Path) -> None:
    if not origin.is_dir():
        raise PermanentBuildError(
            f"local source {str(origin)!r} is not a directory on this worker",
            error_class="source_not_found",
        )
    shutil.copytree(origin, tree, symlinks=True, ignore=shutil.ignore_patterns(".git"))


def _project(tree: Path, request: BuildRequest, recipe: JibRecipe) -> Path:
    root = tree.resolve()
    project = (root / request.context / recipe.module).resolve()
    if not project.is_relative_to(root):
        raise PermanentBuildError(
            f"module {recipe.module!r} (context {request.context!r}) leads out of the source",
            error_class="source_not_found",
        )
    if not (project / "pom.xml").is_file():
        raise PermanentBuildError(
            f"no pom.xml in module {recipe.module!r} (context {request.context!r}) of the "
            "source; recipe.module names the directory of the project's pom.xml",
            error_class="source_not_found",
        )
    return project


async def _fetch(git: str, url: str, revision: str, tree: Path, *, full: bool) -> None:
    await asyncio.to_thread(tree.mkdir, parents=True)
    await _git(git, tree, "init", "--quiet")
    depth = [] if full else ["--depth", "1"]
    await _git(git, tree, "fetch", "--quiet", *depth, "--", url, revision)
    await _git(git, tree, "checkout", "--quiet", "--detach", "FETCH_HEAD")


async def _git(git: str, cwd: Path, *args: str) -> None:
    try:
        process = await spawn(
            git, *args,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **_GIT_ENV},
            start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        raise PermanentBuildError(f"cannot run {git!r}: {exc}", error_class="config") from exc
    try:
        out, _ = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # git and its transport helpers
        await asyncio.shield(process.wait())
        raise
    if process.returncode != 0:
        lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
        message = f"git {args[0]}: {lines[-1] if lines else f'exit status {process.returncode}'}"
        raise classify(message)
