"""Connections to the fleet's Redis: one function, the same hygiene in every process.

Workers, the gateway, the CLI and the Python client all connect through `connect`, so each
of them sets a connect and a socket timeout (a half-open connection fails a command instead
of hanging it), TCP keepalive and a health check of idle connections, and each of them can
reach the primary through Redis Sentinel. With Sentinel, a connection that finds its server
demoted (READONLY) drops itself and asks the sentinels again: a failover looks like a short
outage to the code above, which retries (see producer/resilience.py).

Every connection bounds a send by the socket timeout in the caller's task: redis-py does
it with `asyncio.wait_for`, which on Python 3.11 runs each send in a task of its own (one
task per command or pipeline, a large share of a busy worker's or gateway's CPU).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.settings import RedisSettings, redact_url

SENTINEL_SCHEME = "redis+sentinel"

_R = TypeVar("_R", bound=Redis)


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a `redis+sentinel://` URL names."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """`redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL: {redact_url(url)!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    password = unquote(userinfo.partition(":")[2]) if userinfo else None
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"expected HOST:PORT for each sentinel, got {item!r} in {redact_url(url)!r}"
            )
        sentinels.append((host.strip("[]"), int(port)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"expected /SERVICE or /SERVICE/DB after the sentinels in {redact_url(url)!r}"
        )
    db = int(path[1]) if len(path) == 2 else 0
    return SentinelTarget(tuple(sentinels), path[0], db, password or None)


class _SendInPlace(AbstractConnection):
    """redis-py's send, bounded by `asyncio.timeout` instead of a task per send; its errors
    as redis-py raises them."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.socket_timeout:
            return await super().send_packed_command(command, check_health)
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        elif check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        writer = self._writer
        assert writer is not None  # connected above
        try:
            writer.writelines(command)
            async with asyncio.timeout(self.socket_timeout):
                await writer.drain()
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await self.disconnect(nowait=True)
            raise


class _TcpConnection(_SendInPlace, Connection):
    pass


class _TlsConnection(_SendInPlace, SSLConnection):
    pass


class _UnixConnection(_SendInPlace, UnixDomainSocketConnection):
    pass


_CONNECTION_CLASSES: Final[dict[str, type[AbstractConnection]]] = {
    "redis": _TcpConnection,
    "rediss": _TlsConnection,
    "unix": _UnixConnection,
}


class FailoverAwareConnection(_SendInPlace, SentinelManagedConnection):
    """A connection to the primary Sentinel names, which asks Sentinel again as soon as its
    server says it is no longer a primary that can take writes: demoted (READONLY, as
    redis-py does), or cut off from its replicas (NOREPLICAS, what `min-replicas-to-write`
    answers once a failover has promoted the replica: the old primary keeps accepting
    writes until Sentinel demotes it, seconds later, and those writes would be lost)."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not str(exc).startswith("NOREPLICAS"):
                raise
            await self.disconnect()
            raise RedisConnectionError("the primary lost its replicas; asking Sentinel") from exc


def _options(settings: RedisSettings) -> dict[str, Any]:
    return {
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_timeout": settings.socket_timeout_s,
        "socket_keepalive": settings.keepalive,
        "health_check_interval": settings.health_check_interval_s,
    }


def connect(settings: RedisSettings, redis_class: type[_R]) -> _R:
    """A client of the fleet's Redis (bytes in, bytes out), as `redis_class` (`Redis`, or
    arq's `ArqRedis` for a worker).

    No connection is made until the first command: an unreachable Redis is reported by
    the first command that needs it, as every later outage is.
    """
    options = _options(settings)
    if urlsplit(settings.url).scheme == SENTINEL_SCHEME:
        target = parse_sentinel_url(settings.url)
        password = settings.password or target.password
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels),
            sentinel_kwargs={
                key: options[key]
                for key in ("socket_connect_timeout", "socket_timeout", "socket_keepalive")
            },
            **options,
        )
        primary = sentinel.master_for(
            target.service,
            redis_class=redis_class,
            db=target.db,
            password=password,
            connection_class=FailoverAwareConnection,
        )
        return cast(_R, primary)
    if settings.password is not None:
        options["password"] = settings.password
    client = redis_class.from_url(settings.url, **options)
    # After from_url, which sets the class of unix:// and rediss:// URLs itself.
    client.connection_pool.connection_class = _CONNECTION_CLASSES[urlsplit(settings.url).scheme]
    return cast(_R, client)
