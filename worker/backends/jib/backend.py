"""Builds Java projects with Jib on the worker: `mvn compile jib:build`, no daemon, no Dockerfile.

One Maven process per attempt, from an argument list (worker/backends/jib/maven.py), in a
process group of its own, on the attempt's own copy of the source (workspace.py). Maven's
local repository is the worker's (`jib.maven_repository`), so warm builds download nothing.
Jib writes the digest it pushed to a file; the registry is then asked for every tag's digest
and must agree. Cancelling (cancel, timeout, drain) signals the whole group, SIGTERM then
SIGKILL after `cancel_grace_s`.

Trust: a Maven build runs the project's own plugins on the worker, as a Dockerfile's RUN
steps run in a builder; the worker that runs this backend is a builder, not a control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Final

from producer.contract import BuildRequest, JibRecipe
from worker.backends.base import BuildJob, Built, ProgressSink
from worker.backends.capabilities import ensure_capable
from worker.backends.jib import registry
from worker.backends.jib.maven import (
    JibRequestError,
    MavenSteps,
    check,
    clean,
    insecure,
    maven_argv,
    target,
)
from worker.backends.jib.workspace import checkout
from worker.errors import BuildError, PermanentBuildError, TemporaryBuildError
from worker.retry import classify
from worker.settings import JibSettings
from worker.subprocesses import spawn

_LINE_LIMIT: Final = 16 << 20


class JibBackend:
    name = "jib"

    def __init__(self, settings: JibSettings, *, tail_lines: int = 20) -> None:
        self.settings = settings
        self.tail_lines = tail_lines

    async def build(self, job: BuildJob, progress: ProgressSink) -> Built:
        request = job.request
        ensure_capable(request, "jib")
        recipe = request.recipe
        assert isinstance(recipe, JibRecipe)  # ensure_capable refused any other
        try:
            check(recipe, request)
        except JibRequestError as exc:
            raise PermanentBuildError(str(exc), error_class="unsupported") from exc
        with tempfile.TemporaryDirectory(prefix="buildfleet-jib-") as scratch:
            digest = await self._maven(job, recipe, Path(scratch), progress)
        if digest is not None:
            await self._verify(request, digest)
        return Built(digest=digest)

    async def _maven(
        self, job: BuildJob, recipe: JibRecipe, scratch: Path, progress: ProgressSink
    ) -> str | None:
        """Run Maven on a fresh copy of the source; the digest Jib pushed (None: not pushed)."""
        request = job.request
        project = await checkout(self.settings.git, request, recipe, scratch)
        digest_file = scratch / "digest"
        argv = maven_argv(self.settings, recipe, request, project / "pom.xml", digest_file)
        steps = MavenSteps(request.id, job.attempt, tail_lines=self.tail_lines)
        returncode = await self._run(argv, project, steps, progress)
        error = _failure(returncode, steps, scratch) if returncode != 0 else None
        for event in steps.finish(time.time(), error.message if error else None):
            await progress(event)
        if error is not None:
            raise error
        return _read_digest(digest_file) if request.push else None

    async def _verify(self, request: BuildRequest, digest: str) -> None:
        if not self.settings.verify_push:
            return
        plain_http = insecure(self.settings, [target(request).image])
        for image in request.images:
            served = await registry.served_digest(image, plain_http=plain_http)
            if served is not None and served != digest:
                raise TemporaryBuildError(
                    f"Jib reported {digest} for {image} but the registry serves {served}",
                    error_class="push_inconsistent",
                )

    async def _run(
        self, argv: list[str], cwd: Path, steps: MavenSteps, progress: ProgressSink
    ) -> int:
        env = dict(os.environ)
        if self.settings.java_home:
            env["JAVA_HOME"] = self.settings.java_home
        try:
            process = await spawn(
                *argv,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                limit=_LINE_LIMIT,
                start_new_session=True,
            )
        except OSError as exc:
            raise PermanentBuildError(
                f"cannot run {argv[0]!r}: {exc}", error_class="config"
            ) from exc
        reader = asyncio.ensure_future(_read(process, steps, progress))
        try:
            returncode = await process.wait()
            _kill_group(process.pid)  # a forked JVM left behind would hold the pipe open
            await reader
            return returncode
        except BaseException:
            reader.cancel()
            await self._stop(process)
            raise

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM to Maven's whole group (forked compilers, JVMs), SIGKILL if it lingers."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), self.settings.cancel_grace_s)
        _kill_group(process.pid)
        await asyncio.shield(process.wait())

    async def aclose(self) -> None:
        return None


async def _read(
    process: asyncio.subprocess.Process, steps: MavenSteps, progress: ProgressSink
) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        for event in steps.feed(raw.decode(errors="replace"), time.time()):
            await progress(event)


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def _read_digest(digest_file: Path) -> str:
    try:
        return digest_file.read_text().strip()
    except FileNotFoundError as exc:
        raise TemporaryBuildError(
            "Maven succeeded but Jib wrote no image digest", error_class="push_failed"
        ) from exc


def _failure(returncode: int, steps: MavenSteps, scratch: Path) -> BuildError:
    if returncode < 0:
        return TemporaryBuildError(
            f"mvn was killed by signal {-returncode}", error_class="builder_killed"
        )
    tail = tuple(steps.tail)
    message = steps.failure() or (clean(tail[-1]) if tail else f"mvn exit status {returncode}")
    # The attempt's scratch directory means nothing to the user: paths inside the source.
    message = message.replace(f"{scratch.resolve()}/source/", "").replace(f"{scratch}/source/", "")
    step = steps.current.name if steps.current is not None else None
    return classify(message, step=step, log_tail=tail)
