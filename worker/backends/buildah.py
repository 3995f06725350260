"""Builds with Buildah on the worker: `buildah build`, then `buildah push --digestfile` per image.

One `buildah build` subprocess per attempt, from an argument list (never a shell string),
with buildah's own storage root, `--isolation chroot` (or `oci`), `--layers` and
`--force-rm` (no working container is left by a failed or cancelled build); rootless
when the worker is not root (buildah then enters a user namespace itself). Its `STEP n/m:`
lines become Step events and everything else Log events; a failure is read from its last
`Error: ...` line, with the step that was running.

Each buildah runs in a process group of its own. Cancelling signals the whole group,
SIGTERM then SIGKILL after `cancel_grace_s`: under chroot isolation a RUN step's process
is buildah's child, and signalling buildah alone would leave it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from producer.contract import BuildRequest, GitSource, LocalSource
from worker.backends.base import BuildJob, Built, ProgressSink
from worker.backends.capabilities import BY_BACKEND, refusal
from worker.backends.secrets import buildah_flags, sources_for
from worker.backends.steplines import BUILDAH_STEP, NumberedSteps
from worker.errors import BuildError, PermanentBuildError, TemporaryBuildError
from worker.retry import classify
from worker.settings import BuildahSettings, SecretSource
from worker.subprocesses import spawn

_LINE_LIMIT: Final = 16 << 20
_ERROR_PREFIX: Final = "Error: "


def buildah_command(settings: BuildahSettings) -> list[str]:
    """buildah and its global storage flags, ready for a subcommand."""
    root, runroot = settings.storage()
    return [settings.buildah, "--root", root, "--runroot", runroot,
            "--storage-driver", settings.storage_driver]  # fmt: skip


def _registry_flags(settings: BuildahSettings) -> list[str]:
    flags = [f"--tls-verify={str(settings.tls_verify).lower()}"]
    if settings.auth_file:
        flags += ["--authfile", settings.auth_file]
    return flags


def build_argv(
    settings: BuildahSettings,
    request: BuildRequest,
    iidfile: Path,
    secrets: Sequence[SecretSource] = (),
) -> list[str]:
    """The `buildah build` command for one request, mounting `secrets` (where their values
    are, never the values). Pure, so it is tested without buildah."""
    argv = [*buildah_command(settings), "build",
            "--isolation", settings.isolation, "--layers", "--force-rm", "--stdin=false",
            "--iidfile", str(iidfile), *_registry_flags(settings)]  # fmt: skip
    for image in request.images:
        argv += ["--tag", image]
    for name, value in request.build_args.items():
        argv += ["--build-arg", f"{name}={value}"]
    for name, value in request.labels.items():
        argv += ["--label", f"{name}={value}"]
    if request.target:
        argv += ["--target", request.target]
    if request.platforms:
        argv += ["--platform", request.platforms[0]]
    argv += buildah_flags(secrets)
    cache = request.cache
    if cache.disabled:
        argv.append("--no-cache")
    else:
        for ref in cache.import_refs:
            argv += ["--cache-from", _repository(ref)]
        if cache.export_ref:
            argv += ["--cache-to", _repository(cache.export_ref)]
    match request.source:
        case GitSource(url=url) as git:
            subdir = "" if request.context in ("", ".") else f":{request.context}"
            argv += ["--file", request.dockerfile, f"{url}#{git.revision}{subdir}"]
        case LocalSource(path=path):
            context = Path(path, request.context)
            argv += ["--file", str(context / request.dockerfile), str(context)]
    return argv


def _repository(ref: str) -> str:
    """Buildah's cache is a repository (one tag per layer): a ref's own tag is dropped."""
    name, _, digest = ref.partition("@")
    del digest
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':')[0]}" if head else last.split(":")[0]


def push_argv(settings: BuildahSettings, image: str, digestfile: Path) -> list[str]:
    return [*buildah_command(settings), "push", *_registry_flags(settings),
            "--digestfile", str(digestfile), image, f"docker://{image}"]  # fmt: skip


class BuildahBackend:
    name = "buildah"

    def __init__(
        self,
        settings: BuildahSettings,
        *,
        tail_lines: int = 20,
        secrets: Sequence[SecretSource] = (),
    ) -> None:
        self.settings = settings
        self.tail_lines = tail_lines
        self.secrets = tuple(secrets)
        self._remote_cache: bool | None = None

    async def build(self, job: BuildJob, progress: ProgressSink) -> Built:
        request = job.request
        if (reason := refusal(request, BY_BACKEND["buildah"])) is not None:
            raise PermanentBuildError(reason, error_class="unsupported")
        _check_local_source(request)
        secrets = sources_for(request, self.secrets)
        await self._check_remote_cache(request)
        with tempfile.TemporaryDirectory(prefix="buildfleet-buildah-") as scratch:
            steps = NumberedSteps(
                request.id, job.attempt, tail_lines=self.tail_lines, pattern=BUILDAH_STEP
            )
            argv = build_argv(self.settings, request, Path(scratch, "iid"), secrets)
            output: list[str] = []
            returncode = await self._run(argv, steps, output, progress, cwd=scratch)
            if returncode != 0:
                error = _failure(returncode, output, steps)
                for event in steps.finish(time.time(), error.message):
                    await progress(event)
                raise error
            for event in steps.finish(time.time()):
                await progress(event)
            if not request.push:
                return Built(digest=None)
            digests = [
                await self._push(image, Path(scratch, f"digest-{n}"), job, progress)
                for n, image in enumerate(request.images)
            ]
        if len(set(digests)) > 1:
            raise PermanentBuildError(
                f"the tags of one build were pushed with different digests: {digests}",
                error_class="push_inconsistent",
            )
        return Built(digest=digests[0] if digests else None)

    async def _check_remote_cache(self, request: BuildRequest) -> None:
        cache = request.cache
        if cache.disabled or not (cache.import_refs or cache.export_ref):
            return
        if self._remote_cache is None:
            help_text = await _output([*buildah_command(self.settings), "build", "--help"])
            self._remote_cache = "--cache-to" in help_text and "--cache-from" in help_text
        if not self._remote_cache:
            raise PermanentBuildError(
                "the installed buildah cannot use a remote cache (no --cache-from/--cache-to); "
                "drop cache.import_refs and cache.export_ref, or upgrade buildah to 1.27+",
                error_class="unsupported",
            )

    async def _push(
        self, image: str, digestfile: Path, job: BuildJob, progress: ProgressSink
    ) -> str:
        output: list[str] = []
        steps = NumberedSteps(job.request.id, job.attempt, pattern=BUILDAH_STEP)
        returncode = await self._run(
            push_argv(self.settings, image, digestfile), steps, output, progress
        )
        if returncode != 0:
            raise _failure(returncode, output, None, what=f"pushing {image}")
        return _read_digest(digestfile, image)

    async def _run(
        self,
        argv: list[str],
        steps: NumberedSteps,
        output: list[str],
        progress: ProgressSink,
        *,
        cwd: str | None = None,
    ) -> int:
        """Run one buildah command in its own process group; its output becomes events.

        `cwd` is an empty scratch directory: buildah resolves a relative --file against its
        working directory before the context, and the worker's own must never be read."""
        try:
            process = await spawn(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                limit=_LINE_LIMIT,
                start_new_session=True,
                cwd=cwd,
            )
        except OSError as exc:
            raise PermanentBuildError(
                f"cannot run {argv[0]!r}: {exc}", error_class="config"
            ) from exc
        try:
            reader = asyncio.ensure_future(self._read(process, steps, output, progress))
            returncode = await process.wait()
            # buildah is gone; anything left in its group (a RUN step of a buildah that was
            # killed) would hold the output pipe open and outlive the attempt.
            _kill_group(process.pid)
            await reader
            return returncode
        except BaseException:
            reader.cancel()
            await self._stop(process)
            raise

    @staticmethod
    async def _read(
        process: asyncio.subprocess.Process,
        steps: NumberedSteps,
        output: list[str],
        progress: ProgressSink,
    ) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace")
            output.append(line.rstrip())
            del output[:-50]
            for event in steps.feed(line, time.time()):
                await progress(event)

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM to the whole group (buildah and its RUN step), SIGKILL if it lingers."""
        group = process.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), self.settings.cancel_grace_s)
        # Whatever is left in the group (a RUN step that ignored SIGTERM) goes too.
        _kill_group(group)
        await asyncio.shield(process.wait())

    async def aclose(self) -> None:
        return None


def _read_digest(digestfile: Path, image: str) -> str:
    try:
        return digestfile.read_text().strip()
    except FileNotFoundError as exc:
        raise TemporaryBuildError(
            f"buildah pushed {image} without writing its digest", error_class="push_failed"
        ) from exc


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def _check_local_source(request: BuildRequest) -> None:
    if isinstance(request.source, LocalSource):
        context = Path(request.source.path, request.context)
        if not context.is_dir():
            raise PermanentBuildError(
                f"local source {request.source.path!r} has no directory {request.context!r} "
                "on this worker",
                error_class="source_not_found",
            )


def _failure(
    returncode: int, output: list[str], steps: NumberedSteps | None, *, what: str = "buildah"
) -> BuildError:
    if returncode < 0:
        return TemporaryBuildError(
            f"{what} was killed by signal {-returncode}",
            error_class="builder_killed",
        )
    errors = [line.removeprefix(_ERROR_PREFIX) for line in output if line.startswith(_ERROR_PREFIX)]
    message = errors[-1] if errors else (output[-1] if output else f"exit status {returncode}")
    if what != "buildah":
        message = f"{what}: {message}"
    step = steps.current if steps is not None else None
    return classify(
        message,
        step=step.name if step is not None else None,
        log_tail=tuple(steps.tail) if steps is not None else (),
    )


async def _output(argv: list[str]) -> str:
    process = await spawn(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return out.decode(errors="replace")
