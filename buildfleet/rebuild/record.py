"""A batch's record in Redis: what each entry last built, and how long recipes take.

`buildfleet:batch:{id}` holds the batch's own fields (when it was created, how many runs
it had, its cancel flag); `buildfleet:batch:{id}:entries` maps each entry key to the build
that last ran it, with the fingerprint (commit included) of what that build built. Both
live for `BATCH_TTL_S` after the last run. An entry is recorded before its build is
submitted, so an interrupted run never leaves a build the batch does not know about.

Each build's status and result are read from its own record (`producer.keys.build_key`),
the one place they are kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, cast

import msgspec
from redis.asyncio import Redis

from producer.contract import BuildResult, Status, decode_result
from producer.keys import DURATIONS_KEY, batch_entries_key, batch_key, build_key

BATCH_TTL_S: Final = 30 * 24 * 3600


class EntryRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    build_id: str
    fingerprint: str
    name: str
    origin: str
    source: str
    recipe: str = ""
    images: tuple[str, ...] = ()
    matches: tuple[str, ...] = ()


class BuildStatus(msgspec.Struct, frozen=True):
    status: Status
    result: BuildResult | None = None


_entry_decoder: Final = msgspec.json.Decoder(EntryRecord)
_encoder: Final = msgspec.json.Encoder()


class BatchRecord:
    def __init__(self, redis: Redis, batch_id: str) -> None:
        self.redis = redis
        self.batch_id = batch_id
        self.key = batch_key(batch_id)
        self.entries_key = batch_entries_key(batch_id)

    async def start_run(self) -> int:
        """A new run of the batch; its number (1 for a new batch). Clears a cancel."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self.key, "created_at", repr(time.time()))
            pipe.hincrby(self.key, "runs", 1)
            pipe.hdel(self.key, "cancelled")
            pipe.expire(self.key, BATCH_TTL_S)
            pipe.expire(self.entries_key, BATCH_TTL_S)
            _, runs, *_ = await pipe.execute()
        return int(runs)

    async def exists(self) -> bool:
        return bool(await self.redis.exists(self.key))

    async def entries(self) -> dict[str, EntryRecord]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(self.entries_key)  # type: ignore[misc]
        return {key.decode(): _entry_decoder.decode(value) for key, value in raw.items()}

    async def remember(self, records: Iterable[tuple[str, EntryRecord]]) -> bool:
        """Record these entries' builds; whether the batch has been cancelled (read after)."""
        mapping = {key: _encoder.encode(record) for key, record in records}
        async with self.redis.pipeline(transaction=False) as pipe:
            if mapping:
                pipe.hset(self.entries_key, mapping=mapping)
                pipe.expire(self.entries_key, BATCH_TTL_S)
            pipe.hexists(self.key, "cancelled")
            *_, cancelled = await pipe.execute()
        return bool(cancelled)

    async def cancel(self) -> None:
        await self.redis.hset(self.key, "cancelled", repr(time.time()))  # type: ignore[misc]

    async def cancelled(self) -> bool:
        return bool(await self.redis.hexists(self.key, "cancelled"))  # type: ignore[misc]

    async def statuses(self, build_ids: Sequence[str]) -> dict[str, BuildStatus]:
        """Where each build stands now; a build with no record (expired, or never
        submitted) is missing from the answer."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for build_id in build_ids:
                pipe.hmget(build_key(build_id), ["status", "result"])
            replies: list[list[bytes | None]] = await pipe.execute()
        found: dict[str, BuildStatus] = {}
        for build_id, (status, result) in zip(build_ids, replies, strict=True):
            if status is not None:
                found[build_id] = BuildStatus(
                    cast(Status, status.decode()), decode_result(result) if result else None
                )
        return found


async def durations(redis: Redis, recipes: Iterable[str]) -> dict[str, float]:
    """How long builds of these recipes took (those that ever succeeded)."""
    wanted = list(dict.fromkeys(recipes))
    if not wanted:
        return {}
    values: list[bytes | None] = await redis.hmget(DURATIONS_KEY, wanted)  # type: ignore[misc]
    return {recipe: float(v) for recipe, v in zip(wanted, values, strict=True) if v is not None}


async def remember_durations(redis: Redis, seconds: Mapping[str, float]) -> None:
    if seconds:
        await redis.hset(DURATIONS_KEY, mapping={k: repr(v) for k, v in seconds.items()})  # type: ignore[misc]
