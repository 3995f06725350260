"""Builds through a Docker daemon's Engine API: `POST /build`, then `POST /images/{name}/push`.

One attempt:
1. refuse what the daemon's builder cannot do (capabilities), before anything starts;
2. `POST /build` with the context as a gzipped tar streamed from a thread (local sources,
   `.dockerignore` applied) or as `remote=URL#REF[:SUBDIR]` (git sources, fetched by the
   daemon); BuildKit (`version=2`) or the classic builder, per `docker.builder`;
3. read the stream into Step and Log events until the image id or an error arrives;
4. push each image (`X-Registry-Auth`), and take the digest from each push's aux; every
   tag must get the same digest.
Cancelling drops the request's connection, and the daemon stops the build (or the push).
Cache: `cachefrom` imports; the export is inline (`BUILDKIT_INLINE_CACHE=1`, the cache
metadata in the pushed image, tagged and pushed as `cache.export_ref` too), mode=min only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import msgspec

from producer.contract import BuildRequest, GitSource, LocalSource
from worker.backends.base import BuildJob, Built, ProgressSink
from worker.backends.capabilities import BY_BACKEND, Capabilities, refusal
from worker.backends.docker_api import (
    DockerDaemon,
    quoted,
    registry_auth_header,
    registry_config_header,
)
from worker.backends.docker_context import context_tarball
from worker.backends.docker_progress import BuildStream, PushStream
from worker.errors import PermanentBuildError
from worker.settings import DockerSettings

GIT_SUBDIR_API: Final = (1, 42)
"""Docker 23 (API 1.42) is the first whose BuildKit builds a git sub-directory."""
_DOCKER_HUB: Final = "https://index.docker.io/v1/"


def capabilities(settings: DockerSettings) -> Capabilities:
    """What this backend can do with the configured builder."""
    caps = BY_BACKEND["docker"]
    if settings.builder == "classic":  # no inline cache, but git sub-directories work
        return dataclasses.replace(caps, cache_export_modes=frozenset(), git_subdir=True)
    return caps


def split_reference(image: str) -> tuple[str, str]:
    """`host:port/repo:tag` as (repository, tag), the tag `latest` when none is given."""
    if "@" in image:
        raise PermanentBuildError(
            f"cannot build and push to a digest reference ({image!r}); name a tag",
            error_class="invalid_request",
        )
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        return image, "latest"
    return repository, tag


def registry_host(repository: str) -> str:
    first, _, rest = repository.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return _DOCKER_HUB


class _AuthEntry(msgspec.Struct):
    auth: str = ""


class _DockerConfig(msgspec.Struct):
    auths: dict[str, _AuthEntry] = {}


def load_credentials(auth_file: str | None) -> dict[str, dict[str, str]]:
    """Registry host -> {username, password, serveraddress}, from a Docker config.json."""
    if auth_file is None:
        return {}
    try:
        config = msgspec.json.decode(Path(auth_file).read_bytes(), type=_DockerConfig)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PermanentBuildError(
            f"docker.auth_file {auth_file!r} is not a readable Docker config.json: {exc}",
            error_class="config",
        ) from exc
    credentials = {}
    for host, entry in config.auths.items():
        try:
            user, _, password = base64.b64decode(entry.auth).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            continue
        credentials[host] = {"username": user, "password": password, "serveraddress": host}
    return credentials


def build_params(
    request: BuildRequest, settings: DockerSettings, tags: tuple[str, ...]
) -> list[tuple[str, str]]:
    """The query of `POST /build` for one request. Pure, so it is tested without a daemon."""
    params = [("t", tag) for tag in tags]
    params.append(("version", "2" if settings.builder == "buildkit" else "1"))
    params += [("rm", "1"), ("forcerm", "1"), ("networkmode", settings.network_mode)]
    build_args = dict(request.build_args)
    match request.source:
        case GitSource(url=url) as git:
            subdir = "" if request.context in ("", ".") else f":{request.context}"
            params.append(("remote", f"{url}#{git.revision}{subdir}"))
    params.append(("dockerfile", request.dockerfile))
    cache = request.cache
    if cache.disabled:
        params.append(("nocache", "1"))
    else:
        if cache.import_refs:
            params.append(("cachefrom", json.dumps(list(cache.import_refs))))
        if cache.export_ref:
            build_args["BUILDKIT_INLINE_CACHE"] = "1"
    if build_args:
        params.append(("buildargs", json.dumps(build_args)))
    if request.labels:
        params.append(("labels", json.dumps(request.labels)))
    if request.target:
        params.append(("target", request.target))
    if request.platforms:
        params.append(("platform", request.platforms[0]))
    return params


def _local_context(request: BuildRequest) -> Path | None:
    if not isinstance(request.source, LocalSource):
        return None
    context = Path(request.source.path, request.context)
    if not context.is_dir():
        raise PermanentBuildError(
            f"local source {request.source.path!r} has no directory {request.context!r} "
            "on this worker",
            error_class="source_not_found",
        )
    return context


class DockerBackend:
    name = "docker"

    def __init__(self, settings: DockerSettings, *, tail_lines: int = 20) -> None:
        self.settings = settings
        self.tail_lines = tail_lines
        self.capabilities = capabilities(settings)
        self._credentials = load_credentials(settings.auth_file)
        self._daemons: dict[str, DockerDaemon] = {}

    def daemon(self, address: str) -> DockerDaemon:
        """The connection pool of one daemon, made on first use."""
        if address not in self._daemons:
            self._daemons[address] = DockerDaemon(
                address,
                tls_dir=self.settings.tls_dir,
                connect_timeout_s=self.settings.connect_timeout_s,
                max_connections=self.settings.max_connections,
            )
        return self._daemons[address]

    async def build(self, job: BuildJob, progress: ProgressSink) -> Built:
        request = job.request
        if (reason := refusal(request, self.capabilities)) is not None:
            raise PermanentBuildError(reason, error_class="unsupported")
        targets = [split_reference(image) for image in self._tags(request)]
        context = _local_context(request)
        daemon = self.daemon(job.placement or self._default_address())
        await self._check_git_subdir(daemon, request)
        stream = BuildStream(request.id, job.attempt, tail_lines=self.tail_lines)
        await self._build(daemon, request, stream, context, progress)
        if not request.push:
            return Built(digest=None)
        digests = {
            image: await self._push(daemon, job, repository, tag, progress)
            for image, (repository, tag) in zip(self._tags(request), targets, strict=True)
        }
        if len(set(digests.values())) > 1:
            raise PermanentBuildError(
                f"the tags of one build were pushed with different digests: {digests}",
                error_class="push_inconsistent",
            )
        return Built(digest=next(iter(digests.values()), None))

    @staticmethod
    def _tags(request: BuildRequest) -> tuple[str, ...]:
        export = request.cache.export_ref
        if export and not request.cache.disabled and export not in request.images:
            return (*request.images, export)
        return request.images

    def _default_address(self) -> str:
        if not self.settings.daemons:
            raise PermanentBuildError(
                "no Docker daemon is configured (docker.daemons)", error_class="config"
            )
        return self.settings.daemons[0].address

    async def _check_git_subdir(self, daemon: DockerDaemon, request: BuildRequest) -> None:
        if (
            not isinstance(request.source, GitSource)
            or request.context in ("", ".")
            or self.settings.builder != "buildkit"
        ):
            return
        api = await daemon.version()
        if tuple(int(part) for part in api.split(".")) < GIT_SUBDIR_API:
            raise PermanentBuildError(
                f"this Docker daemon's BuildKit (Engine {daemon.engine_version}, API {api}) "
                f"cannot build the git sub-directory {request.context!r} (context); use "
                "Docker 23 or newer, or docker.builder = 'classic'",
                error_class="unsupported",
            )

    async def _build(
        self,
        daemon: DockerDaemon,
        request: BuildRequest,
        stream: BuildStream,
        context: Path | None,
        progress: ProgressSink,
    ) -> None:
        headers = {"Content-Type": "application/x-tar"}
        if self._credentials:
            pulls = {
                host: {"username": c["username"], "password": c["password"]}
                for host, c in self._credentials.items()
            }
            headers["X-Registry-Config"] = registry_config_header(pulls)
        body: AsyncIterator[bytes] | None = None
        if context is not None:
            body = context_tarball(context, request.dockerfile)
        params = build_params(request, self.settings, self._tags(request))
        async with daemon.stream("POST", "/build", params=params, headers=headers, body=body) as (
            messages
        ):
            async for message in messages:
                for event in stream.feed(message):
                    await progress(event)
        for event in stream.finish():
            await progress(event)
        if stream.error is not None or stream.image_id is None:
            raise stream.failure()

    async def _push(
        self,
        daemon: DockerDaemon,
        job: BuildJob,
        repository: str,
        tag: str,
        progress: ProgressSink,
    ) -> str:
        image = f"{repository}:{tag}"
        pushed = PushStream(job.request.id, job.attempt, image)
        headers = {
            "X-Registry-Auth": registry_auth_header(
                self._credentials.get(registry_host(repository))
            )
        }
        async with daemon.stream(
            "POST", f"/images/{quoted(repository)}/push", params=[("tag", tag)], headers=headers
        ) as messages:
            async for message in messages:
                for event in pushed.feed(message):
                    await progress(event)
        if pushed.error is not None or pushed.digest is None:
            raise pushed.failure()
        return pushed.digest

    async def probe(self, address: str) -> bool:
        """The health probe: `GET /_ping`."""
        return await self.daemon(address).ping()

    async def aclose(self) -> None:
        daemons, self._daemons = self._daemons, {}
        for daemon in daemons.values():
            await daemon.aclose()
