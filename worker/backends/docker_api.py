"""The slice of the Docker Engine API the docker backend uses, over aiohttp (no Docker SDK).

One `DockerDaemon` per daemon address: `unix:///run/docker.sock`, or `tcp://HOST:PORT`
(with TLS when a cert directory is given). The API version is negotiated once per
connection from `GET /version`: the lower of the daemon's and `NEWEST_API`, refused below
`OLDEST_API` or the daemon's own minimum, and never a fixed one (Docker 29 refuses anything
below 1.44; Debian's dockerd 20.10 stops at 1.41).

Every foreign error is mapped here, once, to a domain error: a daemon that cannot be
reached or drops the connection is Temporary with the daemon at fault; an HTTP error
status is classified by its message. Streams (build, push) are JSON messages, one a line;
an error in a stream arrives as a message with `error`/`errorDetail` under HTTP 200.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final
from urllib.parse import quote

import aiohttp
import msgspec

from worker.backends.docker_progress import StreamMessage
from worker.errors import BuildError, PermanentBuildError, TemporaryBuildError
from worker.retry import classify

NEWEST_API: Final = (1, 47)
"""The newest Engine API version this backend was written against (Docker 27)."""
OLDEST_API: Final = (1, 40)
"""BuildKit builds through the API (`version=2`) and `platform` need at least this."""
_STREAM_LINE_LIMIT: Final = 16 << 20
_CONNECTION_ERRORS: Final = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    ConnectionError,
    TimeoutError,
)


class _Version(msgspec.Struct):
    ApiVersion: str
    MinAPIVersion: str = "1.12"
    Version: str = ""


class _Message(msgspec.Struct):
    message: str = ""


_message_decoder: Final = msgspec.json.Decoder(StreamMessage)
_version_decoder: Final = msgspec.json.Decoder(_Version)
_error_decoder: Final = msgspec.json.Decoder(_Message)


def parse_api_version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor)


def negotiate(daemon_api: str, daemon_min: str) -> str:
    """The API version to speak: the lower of the daemon's and ours, within both ranges."""
    theirs, their_min = parse_api_version(daemon_api), parse_api_version(daemon_min)
    chosen = min(theirs, NEWEST_API)
    if chosen < OLDEST_API or chosen < their_min:
        raise PermanentBuildError(
            f"the Docker daemon speaks API {daemon_min} to {daemon_api}; this backend needs "
            f"{OLDEST_API[0]}.{OLDEST_API[1]} to {NEWEST_API[0]}.{NEWEST_API[1]}",
            error_class="config",
        )
    return f"{chosen[0]}.{chosen[1]}"


def lost(address: str, exc: BaseException) -> TemporaryBuildError:
    """The daemon could not be reached, or went away mid-request."""
    detail = str(exc) or type(exc).__name__
    return TemporaryBuildError(
        f"Docker daemon {address} unreachable or lost: {detail}",
        error_class="daemon_unreachable",
        daemon_at_fault=True,
    )


def registry_auth_header(credentials: Mapping[str, str] | None) -> str:
    """X-Registry-Auth: base64url JSON (an empty object for anonymous pushes)."""
    return base64.urlsafe_b64encode(json.dumps(dict(credentials or {})).encode()).decode()


def registry_config_header(auths: Mapping[str, Mapping[str, str]]) -> str:
    """X-Registry-Config: every registry's credentials, for pulls during a build."""
    return base64.urlsafe_b64encode(
        json.dumps({h: dict(a) for h, a in auths.items()}).encode()
    ).decode()


def _ssl_context(tls_dir: str) -> ssl.SSLContext:
    directory = Path(tls_dir)
    context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


class DockerDaemon:
    """One daemon: its connection pool and negotiated API version."""

    def __init__(
        self,
        address: str,
        *,
        tls_dir: str | None = None,
        connect_timeout_s: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        self.address = address
        if address.startswith("unix://"):
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
                path=address.removeprefix("unix://"), limit=max_connections
            )
            self.base = "http://docker"
        elif address.startswith("tcp://"):
            tls = _ssl_context(tls_dir) if tls_dir else False
            connector = aiohttp.TCPConnector(ssl=tls, limit=max_connections)
            self.base = ("https://" if tls_dir else "http://") + address.removeprefix("tcp://")
        else:
            raise PermanentBuildError(
                f"Docker daemon address {address!r} is neither unix:// nor tcp://",
                error_class="config",
            )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
            read_bufsize=1 << 16,
        )
        self.api: str | None = None
        self.engine_version = ""

    async def aclose(self) -> None:
        await self.session.close()

    async def ping(self) -> bool:
        try:
            async with self.session.get(f"{self.base}/_ping") as response:
                return response.status == 200 and (await response.read()) == b"OK"
        except _CONNECTION_ERRORS:
            return False

    async def version(self) -> str:
        """The negotiated API version, asked for once per connection to the daemon."""
        if self.api is not None:
            return self.api
        try:
            async with self.session.get(f"{self.base}/version") as response:
                body = await response.read()
        except _CONNECTION_ERRORS as exc:
            raise lost(self.address, exc) from exc
        if response.status != 200:
            raise _status_error(response.status, body, "GET /version")
        answer = _version_decoder.decode(body)
        self.api = negotiate(answer.ApiVersion, answer.MinAPIVersion)
        self.engine_version = answer.Version
        return self.api

    def forget_version(self) -> None:
        """After a lost connection: the daemon may come back as another version."""
        self.api = None

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]],
        headers: Mapping[str, str] | None = None,
        body: AsyncIterator[bytes] | None = None,
    ) -> AsyncIterator[AsyncIterator[StreamMessage]]:
        """A streaming call (build, push): yields its messages as they arrive.

        Leaving the block early (a cancel) closes the connection, which is how the Engine
        API cancels: the daemon stops the build or push whose request went away.
        """
        api = await self.version()
        url = f"{self.base}/v{api}{path}"
        try:
            response = await self.session.request(
                method, url, params=params, headers=dict(headers or {}), data=body
            )
        except _CONNECTION_ERRORS as exc:
            self.forget_version()
            raise lost(self.address, exc) from exc
        try:
            if response.status != 200:
                raise _status_error(response.status, await response.read(), f"{method} {path}")
            yield self._messages(response)
        except BaseException:
            response.close()  # drop the connection: never hand a live build back to the pool
            raise
        else:
            response.release()

    async def _messages(self, response: aiohttp.ClientResponse) -> AsyncIterator[StreamMessage]:
        try:
            # A BuildKit trace (`aux`) of a long build is one line well past aiohttp's
            # default bound (twice `read_bufsize`); the bound stays, for a hostile daemon.
            while line := await response.content.readline(max_line_length=_STREAM_LINE_LIMIT):
                if line.strip():
                    yield _message_decoder.decode(line)
        except _CONNECTION_ERRORS as exc:
            self.forget_version()
            raise lost(self.address, exc) from exc
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TemporaryBuildError(
                f"Docker daemon {self.address} sent an unreadable stream: {exc}",
                error_class="daemon_protocol",
                daemon_at_fault=True,
            ) from exc

    async def call(self, method: str, path: str, *, params: list[tuple[str, str]]) -> bytes:
        """A short call (tag, remove): its body, or a classified error."""
        api = await self.version()
        try:
            async with self.session.request(
                method, f"{self.base}/v{api}{path}", params=params
            ) as response:
                body = await response.read()
        except _CONNECTION_ERRORS as exc:
            self.forget_version()
            raise lost(self.address, exc) from exc
        if response.status >= 300:
            raise _status_error(response.status, body, f"{method} {path}")
        return body


def quoted(name: str) -> str:
    """An image repository as a path segment of the API (slashes kept)."""
    return quote(name, safe="/:")


def _status_error(status: int, body: bytes, what: str) -> BuildError:
    try:
        message = _error_decoder.decode(body).message
    except (msgspec.DecodeError, msgspec.ValidationError):
        message = body.decode(errors="replace").strip()
    text = f"{what}: HTTP {status}: {message or 'no message'}"
    if "HTTP request to an HTTPS server" in message:
        return PermanentBuildError(
            f"{text} (the daemon wants TLS: set docker.tls_dir)", error_class="config"
        )
    if status in (401, 403):
        return PermanentBuildError(text, error_class="auth_denied")
    known = classify(message)
    if isinstance(known, PermanentBuildError):  # a Dockerfile error, a missing base image
        return PermanentBuildError(text, error_class=known.error_class)
    if status >= 500:
        return TemporaryBuildError(text, error_class="daemon_error", daemon_at_fault=True)
    return PermanentBuildError(text, error_class="invalid_request")


async def close_all(daemons: Mapping[str, DockerDaemon]) -> None:
    await asyncio.gather(*(daemon.aclose() for daemon in daemons.values()))
