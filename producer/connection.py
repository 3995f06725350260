"""Connections to the fleet's Redis: one function, the same hygiene in every process.

Workers, the gateway, the CLI and the Python client all connect through `connect`, so each
of them sets a connect and a socket timeout (a half-open connection fails a command instead
of hanging it), TCP keepalive and a health check of idle connections, and each of them can
reach the primary through Redis Sentinel. With Sentinel, a connection that finds its server
demoted (READONLY) drops itself and asks the sentinels again: a failover looks like a short
outage to the code above, which retries (see producer/resilience.py).

Every connection packs its commands with hiredis' C packer, as redis-py's synchronous client
does when hiredis is installed; its asyncio client packs in Python, which cost the fleet's
script calls (dozens of arguments each) 30-85 us a push in the gateway, 4-12 us in C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.typing import EncodableT

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


class HiredisPacking:
    """Commands packed in C by hiredis: the same bytes as redis-py's Python packer, and the
    same DataError for a value Redis cannot take."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)  # type: ignore[arg-type]  # hinted `*args: List`
        return packed


class HiredisConnection(HiredisPacking, Connection):
    pass


class HiredisSSLConnection(HiredisPacking, SSLConnection):
    pass


class HiredisUnixConnection(HiredisPacking, UnixDomainSocketConnection):
    pass


_HIREDIS_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: HiredisConnection,
    SSLConnection: HiredisSSLConnection,
    UnixDomainSocketConnection: HiredisUnixConnection,
}
"""The connection class redis-py picks for a URL's scheme -> the same, packing with hiredis."""


class FailoverAwareConnection(HiredisPacking, SentinelManagedConnection):
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
    pool = client.connection_pool
    pool.connection_class = _HIREDIS_PACKING[pool.connection_class]
    return cast(_R, client)
