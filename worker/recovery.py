"""Builds whose worker died, or whose job was lost, go back to the queue.

The reaper: arq keeps a claim `arq:in-progress:{id}` on a running job until its timeout,
which for a build is an hour. A build whose claim is still there but whose lease is gone
lost its worker (SIGKILL, OOM, a host gone); the reaper deletes the claim, and any worker
runs the job again within seconds. Reaping fences the attempt (a new lease generation), so
a holder that was only cut off cannot renew and build on beside the re-run. A claim
without a lease is normal for the moment between arq taking a job and the attempt
starting, so a build is reaped only when its claim is older than a lease period and it was
seen leaseless on two scans at least `reap_interval_s` apart.

The watchdog: a build that has not ended but has neither a job, a place in the queue nor
a lease lost its job (arq dropped it after a failure the worker could not record, such as
a timeout while Redis was away). It goes back to the queue, or is dead-lettered after
`max_requeues` such losses; the same two-sightings rule applies.

Neither takes a build from anyone right after Redis comes back (to this worker, or from a
restart): leases may have lapsed while Redis was away, and their live holders get one
lease period to renew them first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Final

from redis.asyncio import Redis

from producer import lua
from producer.keys import (
    ACTIVE_BUILDS,
    ARQ_IN_PROGRESS_PREFIX,
    build_key,
    in_progress_key,
    lease_key,
)
from producer.resilience import RedisHealth, persistently
from producer.store import BuildStore
from worker.settings import SchedulingSettings

logger = logging.getLogger("buildfleet.recovery")

_WATCH_PAGE: Final = 500


class Suspicion:
    """Which items were seen suspect, and since when: an item is confirmed once it has
    been seen on two looks at least `patience` seconds apart."""

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self._since: dict[str, float] = {}

    def confirm(self, suspects: Sequence[str], *, complete: bool = True) -> list[str]:
        """The suspects seen long enough; with `complete`, those not seen again are cleared
        (the look covered everything that could be suspect)."""
        now = time.monotonic()
        if complete:
            self._since = {s: self._since.get(s, now) for s in suspects}
        else:
            for suspect in suspects:
                self._since.setdefault(suspect, now)
        confirmed = [s for s in suspects if now - self._since[s] >= self.patience]
        for suspect in confirmed:
            del self._since[suspect]
        return confirmed


class RecoveryGate:
    """Whether it is safe to take builds from others now: Redis has answered this worker
    for at least a lease period, and has itself been up that long (after a restart, every
    lease may have lapsed)."""

    def __init__(self, redis: Redis, health: RedisHealth, settings: SchedulingSettings) -> None:
        self.redis = redis
        self.health = health
        self.settings = settings

    def settled(self) -> bool:
        """Redis has answered this worker for a lease period (no round trip)."""
        return self.health.stable_for() >= self.settings.lease_ttl_s

    async def open(self) -> bool:
        if not self.settled():
            return False
        info = await self.redis.info("server")
        return float(info.get("uptime_in_seconds", 0)) >= self.settings.lease_ttl_s


class Reaper:
    def __init__(
        self,
        redis: Redis,
        settings: SchedulingSettings,
        *,
        claim_ttl_s: float,
        health: RedisHealth | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.claim_ttl_s = claim_ttl_s
        """The TTL arq gives a claim (from which a claim's age is read)."""
        self.health = health or RedisHealth()
        self.gate = RecoveryGate(redis, self.health, settings)
        self._suspects = Suspicion(settings.reap_interval_s)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            if not self.gate.settled():
                continue  # (a pass that sends nothing must not tell `health` Redis is back)
            reaped = await persistently(self.scan, health=self.health, doing="reaping")
            for build_id in reaped:
                logger.warning("build %s lost its worker; re-queued", build_id)

    async def scan(self) -> list[str]:
        """One pass; returns the builds handed back to the queue."""
        if not await self.gate.open():
            return []
        claimed = [
            key.decode().removeprefix(ARQ_IN_PROGRESS_PREFIX)
            async for key in self.redis.scan_iter(match=f"{ARQ_IN_PROGRESS_PREFIX}*", count=1000)
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for build_id in claimed:
                pipe.exists(lease_key(build_id))
            leased = await pipe.execute() if claimed else []
        leaseless = [b for b, has in zip(claimed, leased, strict=True) if not has]
        reaped = []
        args = [int(self.claim_ttl_s * 1000), int(self.settings.lease_ttl_s * 1000)]
        for build_id in self._suspects.confirm(leaseless):
            keys = [in_progress_key(build_id), lease_key(build_id), build_key(build_id)]
            if await lua.run(self.redis, lua.REAP, keys, args):
                reaped.append(build_id)
        return reaped


class Watchdog:
    def __init__(
        self,
        store: BuildStore,
        settings: SchedulingSettings,
        *,
        health: RedisHealth | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.health = health or RedisHealth()
        self.gate = RecoveryGate(store.redis, self.health, settings)
        self._suspects = Suspicion(settings.watchdog_interval_s)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watchdog_interval_s)
            if self.gate.settled():
                await persistently(self.scan, health=self.health, doing="looking for lost builds")

    async def scan(self) -> dict[str, str]:
        """One pass over every live build; returns what happened to each lost one."""
        if not await self.gate.open():
            return {}
        lost: list[str] = []
        start = 0
        while page := await self.store.redis.zrange(ACTIVE_BUILDS, start, start + _WATCH_PAGE - 1):
            lost += await self.store.lost_builds([member.decode() for member in page])
            start += len(page)
        outcomes = {}
        for build_id in self._suspects.confirm(lost):
            outcome = await self.store.requeue_lost(
                build_id, max_requeues=self.settings.max_requeues
            )
            if outcome != "alive":
                logger.warning("build %s had lost its job: %s", build_id, outcome)
                outcomes[build_id] = outcome
        return outcomes
