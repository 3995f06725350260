"""Capacity slots and build leases in Redis, shared by every worker process everywhere.

A daemon's slots are a sorted set `buildfleet:slots:{daemon}` of holders scored by expiry;
taking one is a Lua script that drops expired holders and walks the daemons in rank order,
so two workers can never both take a daemon's last slot. A running build's lease
`buildfleet:build:{id}:lease` is set with its Started event and dropped with its terminal
one. One heartbeat per worker renews all its slots and leases in one round trip; when a
worker dies they expire, and the reaper hands its builds back to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from producer.keys import ARQ_IN_PROGRESS_PREFIX, in_progress_key, lease_key, slot_key
from worker.settings import SchedulingSettings

logger = logging.getLogger("buildfleet.capacity")

_ACQUIRE: Final = """
-- KEYS: slot sets in rank order. ARGV: now ms, expiry ms, holder, then each set's max.
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
  if redis.call('ZSCORE', key, ARGV[3]) or redis.call('ZCARD', key) < tonumber(ARGV[3 + i]) then
    redis.call('ZADD', key, ARGV[2], ARGV[3])
    return i
  end
end
return 0
"""

# Hand a build back to the queue when its claim is still there but its lease is gone.
_REAP: Final = """
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class Capacity:
    """This worker's slots and leases, and the heartbeat that keeps them."""

    def __init__(self, redis: Redis, settings: SchedulingSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._acquire = redis.register_script(_ACQUIRE)
        self._slots: dict[str, str] = {}  # build id -> slot set it holds
        self._leases: set[str] = set()

    async def acquire(self, build_id: str, ranked: Sequence[tuple[str, int]]) -> str | None:
        """Take a slot on the first daemon in `ranked` (daemon, max_builds) with room."""
        now_ms = int(time.time() * 1000)
        keys = [slot_key(daemon) for daemon, _ in ranked]
        expiry_ms = now_ms + int(self.settings.slot_ttl_s * 1000)
        limits = [limit for _, limit in ranked]
        index = await self._acquire(keys=keys, args=[now_ms, expiry_ms, build_id, *limits])
        if not index:
            return None
        self._slots[build_id] = keys[int(index) - 1]
        return ranked[int(index) - 1][0]

    async def release(self, build_id: str) -> None:
        key = self._slots.pop(build_id, None)
        if key is not None:
            await self.redis.zrem(key, build_id)

    def hold_lease(self, build_id: str) -> None:
        """The lease itself is written with the Started event; this keeps it renewed."""
        self._leases.add(build_id)

    def drop_lease(self, build_id: str) -> None:
        self._leases.discard(build_id)

    async def heartbeat(self) -> None:
        """Renew every slot and lease this worker holds, until cancelled."""
        interval = min(self.settings.slot_ttl_s, self.settings.lease_ttl_s) / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew()
            except RedisError as exc:
                logger.warning("heartbeat failed, retrying in %.1fs: %s", interval, exc)

    async def _renew(self) -> None:
        if not self._slots and not self._leases:
            return
        expiry_ms = int((time.time() + self.settings.slot_ttl_s) * 1000)
        lease_ms = int(self.settings.lease_ttl_s * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for build_id, key in list(self._slots.items()):
                pipe.zadd(key, {build_id: expiry_ms}, xx=True)
            for build_id in list(self._leases):
                pipe.pexpire(lease_key(build_id), lease_ms)
            await pipe.execute()


class Reaper:
    """Finds builds whose worker died (claimed by arq, lease expired) and re-queues them.

    A claim without a lease is normal for the few milliseconds between arq taking a job and
    the runner publishing Started, so a build is reaped only when it is seen leaseless on two
    scans at least `reap_interval_s` apart.
    """

    def __init__(self, redis: Redis, settings: SchedulingSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._reap = redis.register_script(_REAP)
        self._suspects: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            try:
                for build_id in await self.scan():
                    logger.warning("build %s lost its worker; re-queued", build_id)
            except RedisError as exc:
                logger.warning("reaper scan failed: %s", exc)

    async def scan(self) -> list[str]:
        """One pass; returns the builds handed back to the queue."""
        claimed = [
            key.decode().removeprefix(ARQ_IN_PROGRESS_PREFIX)
            async for key in self.redis.scan_iter(match=f"{ARQ_IN_PROGRESS_PREFIX}*", count=1000)
        ]
        if not claimed:
            self._suspects.clear()
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for build_id in claimed:
                pipe.exists(lease_key(build_id))
            leased = await pipe.execute()
        now = time.monotonic()
        leaseless = {b for b, has in zip(claimed, leased, strict=True) if not has}
        self._suspects = {b: self._suspects.get(b, now) for b in leaseless}
        reaped = []
        for build_id, first_seen in list(self._suspects.items()):
            if now - first_seen >= self.settings.reap_interval_s:
                keys = [in_progress_key(build_id), lease_key(build_id)]
                if await self._reap(keys=keys):
                    reaped.append(build_id)
                del self._suspects[build_id]
        return reaped
