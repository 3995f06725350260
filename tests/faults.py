"""Faults, injected for real: a Redis server of the test's own that it stops, kills,
restarts, starves of memory or fails over; and reading what the fleet recorded."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis

from buildfleet import services
from buildfleet.services import Fsync, Service
from producer.contract import BuildEvent, Started, decode_event, is_terminal
from producer.keys import EVENT_FIELD, EVENTS_STREAM


class OwnRedis:
    """A redis-server on a fixed port with an append-only file, restartable in place."""

    def __init__(
        self,
        workdir: Path,
        *,
        appendfsync: Fsync = "everysec",
        name: str = "redis",
        min_replicas_to_write: int = 0,
    ):
        self.workdir = workdir
        self.appendfsync: Fsync = appendfsync
        self.name = name
        self.min_replicas_to_write = min_replicas_to_write
        self.port = services.free_port()
        self.password = secrets.token_hex(16)
        self.service: Service | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.workdir / "logs" / f"{self.name}.log"

    def start(self) -> None:
        self.service = services.start_redis(
            self.workdir,
            name=self.name,
            port=self.port,
            appendfsync=self.appendfsync,
            password=self.password,
            min_replicas_to_write=self.min_replicas_to_write,
        )

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (Redis shuts down cleanly, its AOF complete) or SIGKILL."""
        assert self.service is not None
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.service.process.pid, signal.SIGKILL)
        self.service.stop()
        self.service = None

    async def restart(self, *, down_s: float, kill: bool = False) -> None:
        await asyncio.to_thread(self.stop, kill=kill)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.start)

    @contextlib.asynccontextmanager
    async def refusing_writes(self) -> AsyncIterator[None]:
        """Redis out of memory (`maxmemory` below what it uses, `noeviction`): every write
        is refused with OOM until the block ends."""
        client = aioredis.Redis.from_url(self.url)
        try:
            await client.config_set("maxmemory", 1)
            yield
        finally:
            await client.config_set("maxmemory", 0)
            await client.aclose()

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None


async def events(redis: aioredis.Redis) -> list[BuildEvent]:
    return [decode_event(fields[EVENT_FIELD]) for _, fields in await redis.xrange(EVENTS_STREAM)]


async def terminal_counts(redis: aioredis.Redis) -> collections.Counter[str]:
    return collections.Counter(e.build_id for e in await events(redis) if is_terminal(e))


async def started_by(redis: aioredis.Redis, build_id: str) -> list[str]:
    """The workers that started `build_id`, in order."""
    return [
        e.worker for e in await events(redis) if isinstance(e, Started) and e.build_id == build_id
    ]


async def until(condition: object, *, poll_s: float = 0.05) -> None:
    """Wait until the awaitable-returning callable `condition` gives something true."""
    assert callable(condition)
    while not await condition():
        await asyncio.sleep(poll_s)
