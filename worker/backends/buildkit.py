"""Builds with a BuildKit daemon through `buildctl`, one subprocess per attempt.

The command is an argument list built from the request (never a shell string). buildctl's
`--progress=rawjson` stderr becomes Step and Log events, `--metadata-file` gives the digest,
a request naming no cache of its own uses its repository's registry cache when one is
configured (worker/registry_cache.py), and `TRACEPARENT` in its environment nests
BuildKit's spans under the attempt's span.
Cancelling the build sends SIGINT (buildctl then cancels the solve on the daemon) and
SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

from producer.contract import BuildRequest, GitSource, LocalSource
from worker.backends.base import BuildJob, Built, ProgressSink
from worker.backends.capabilities import ensure_capable
from worker.backends.secrets import buildctl_flags, sources_for
from worker.errors import PermanentBuildError, TemporaryBuildError
from worker.progress import ProgressParser
from worker.registry_cache import with_registry_cache
from worker.retry import classify
from worker.settings import BuildkitSettings, CacheSettings, SecretSource
from worker.subprocesses import spawn
from worker.telemetry import unsampled_traceparent

_STDERR_LINE_LIMIT: Final = 16 << 20


def _csv_field(field: str) -> str:
    """buildctl reads --output as CSV: a field holding commas is quoted whole."""
    return f'"{field}"' if "," in field else field


def buildctl_argv(
    connection: list[str],
    request: BuildRequest,
    metadata: Path,
    secrets: Sequence[SecretSource] = (),
) -> list[str]:
    """The buildctl command for one request, after `connection` (buildctl and its address and
    TLS flags), mounting `secrets` (where their values are, never the values). Pure, so it
    is tested without a daemon."""
    argv = [
        *connection, "build",
        "--frontend", "dockerfile.v0",
        "--progress", "rawjson",
        "--metadata-file", str(metadata),
    ]  # fmt: skip
    match request.source:
        case GitSource(url=url) as git:
            subdir = "" if request.context in ("", ".") else f":{request.context}"
            argv += ["--opt", f"context={url}#{git.revision}{subdir}"]
            argv += ["--opt", f"filename={request.dockerfile}"]
        case LocalSource(path=path):
            context = Path(path, request.context)
            dockerfile = context / request.dockerfile
            argv += ["--local", f"context={context}"]
            argv += ["--local", f"dockerfile={dockerfile.parent}"]
            argv += ["--opt", f"filename={dockerfile.name}"]
    for name, value in request.build_args.items():
        argv += ["--opt", f"build-arg:{name}={value}"]
    for name, value in request.labels.items():
        argv += ["--opt", f"label:{name}={value}"]
    if request.target:
        argv += ["--opt", f"target={request.target}"]
    if request.platforms:
        argv += ["--opt", f"platform={','.join(request.platforms)}"]
    argv += buildctl_flags(secrets)
    if request.images:
        names = _csv_field(f"name={','.join(request.images)}")
        argv += ["--output", f"type=image,{names},push={str(request.push).lower()}"]
    cache = request.cache
    if cache.disabled:
        argv.append("--no-cache")
    else:
        for ref in cache.import_refs:
            argv += ["--import-cache", f"type=registry,ref={ref}"]
        if cache.export_ref:
            argv += [
                "--export-cache",
                f"type=registry,ref={cache.export_ref},mode={cache.mode},ignore-error=true",
            ]
    return argv


class _Metadata(msgspec.Struct):
    digest: str | None = msgspec.field(default=None, name="containerimage.digest")


_metadata_decoder: Final = msgspec.json.Decoder(_Metadata)


def _check_local_source(request: BuildRequest) -> None:
    if isinstance(request.source, LocalSource) and not Path(request.source.path).is_dir():
        raise PermanentBuildError(
            f"local source {request.source.path!r} is not a directory on this worker",
            error_class="source_not_found",
        )


def _read_digest(metadata: Path) -> str | None:
    try:
        return _metadata_decoder.decode(metadata.read_bytes()).digest
    except FileNotFoundError as exc:
        # Seen when buildkitd dies mid-solve: buildctl's status stream ends and it exits 0
        # without writing the metadata it writes after every export.
        raise TemporaryBuildError(
            "buildctl ended without a result: the daemon was lost",
            error_class="daemon_unreachable",
            daemon_at_fault=True,
        ) from exc


def _probe_env() -> dict[str, str]:
    """buildctl's environment for a health probe: no trace of its own every few seconds."""
    return {**os.environ, "TRACEPARENT": unsampled_traceparent()}


class BuildkitBackend:
    name = "buildkit"

    def __init__(
        self,
        settings: BuildkitSettings,
        *,
        tail_lines: int = 20,
        secrets: Sequence[SecretSource] = (),
        cache: CacheSettings | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache or CacheSettings()
        self.tail_lines = tail_lines
        self.secrets = tuple(secrets)

    async def build(self, job: BuildJob, progress: ProgressSink) -> Built:
        address = job.placement or self._default_address()
        request = with_registry_cache(job.request, self.cache)
        ensure_capable(request, self.name)
        _check_local_source(request)
        secrets = sources_for(request, self.secrets)
        with tempfile.TemporaryDirectory(prefix="buildfleet-") as scratch:
            metadata = Path(scratch, "metadata.json")
            connection = self.settings.connection(address)
            argv = buildctl_argv(connection, request, metadata, secrets)
            parser = ProgressParser(request.id, job.attempt, tail_lines=self.tail_lines)
            returncode = await self._run(argv, job.traceparent, parser, progress)
            if returncode != 0:
                raise self._failure(parser, returncode)
            return Built(digest=_read_digest(metadata) if request.images else None)

    def _default_address(self) -> str:
        if not self.settings.daemons:
            raise PermanentBuildError(
                "no BuildKit daemon is configured (buildkit.daemons)", error_class="config"
            )
        return self.settings.daemons[0].address

    async def _run(
        self,
        argv: list[str],
        traceparent: str | None,
        parser: ProgressParser,
        progress: ProgressSink,
    ) -> int:
        # buildctl hands its spans to buildkitd, which exports them with its own: the
        # worker's OTLP settings would make it export each one twice. Naming the service
        # costs buildctl about 5 ms a build (bench/bench_overhead.py): only when traced.
        env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
        if traceparent:
            env["OTEL_SERVICE_NAME"] = "buildctl"
            env["TRACEPARENT"] = traceparent
        try:
            process = await spawn(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                limit=_STDERR_LINE_LIMIT,
            )
        except OSError as exc:
            raise PermanentBuildError(
                f"cannot run {argv[0]!r}: {exc}", error_class="config"
            ) from exc
        assert process.stderr is not None
        try:
            async for line in process.stderr:
                for event in parser.feed(line):
                    await progress(event)
            return await process.wait()
        except BaseException:
            await self._stop(process)
            raise

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        """SIGINT lets buildctl cancel the solve on the daemon; SIGKILL if it lingers."""
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), self.settings.cancel_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(process.wait())

    def _failure(self, parser: ProgressParser, returncode: int) -> Exception:
        failed = parser.failed_step
        summary = [line for line in parser.other_output if "error" in line.lower()]
        message = (
            summary[-1]
            if summary
            else (failed.error if failed and failed.error else None)
            or (parser.other_output[-1] if parser.other_output else None)
            or f"buildctl exited with code {returncode}"
        )
        message = message.removeprefix("error: ").removeprefix("ERROR: ")
        return classify(
            message,
            step=failed.name if failed else None,
            log_tail=parser.log_tail(failed.vertex) if failed else (),
        )

    async def probe(self, address: str) -> bool:
        """The health probe: `buildctl debug workers` answers."""
        try:
            process = await asyncio.create_subprocess_exec(
                *self.settings.connection(address), "debug", "workers",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=_probe_env(),
            )  # fmt: skip
        except OSError:
            return False
        try:
            return await process.wait() == 0
        finally:
            if process.returncode is None:  # the caller's timeout ran out
                process.kill()
                await asyncio.shield(process.wait())

    async def aclose(self) -> None:
        return None
