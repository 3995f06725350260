"""Where a build runs: the placer picks a daemon and holds one of its capacity slots.

`LeasedPlacer` ranks the healthy daemons for the build's cache key (worker.routing), takes
a slot in that order (worker.capacity, atomic in Redis): on the daemon holding its cache
if one frees within `spill_after_s`, else on the first with room (the load bound), waiting
with backoff while every daemon is full. `DaemonHealth` probes
each daemon with `buildctl debug workers`; a daemon that fails is left out until a probe
succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from producer.contract import BuildRequest
from worker.capacity import Capacity
from worker.routing import rank
from worker.settings import BuildkitSettings, DaemonSettings, SchedulingSettings
from worker.telemetry import unsampled_traceparent

logger = logging.getLogger("buildfleet.scheduling")


class Placer(Protocol):
    def place(
        self, request: BuildRequest, avoid: Sequence[str] = ()
    ) -> AbstractAsyncContextManager[str | None]:
        """Wait for room, then yield where to build; leaving the block frees the room.

        `avoid` names places that failed this build before: they are used only when
        nothing else is available.
        """
        ...

    def blame(self, placement: str) -> None:
        """A build failed because of this place (a daemon lost, say)."""
        ...


class FixedPlacer:
    """Every build goes to one place, with no capacity accounting (simulate, benchmarks)."""

    def __init__(self, placement: str | None) -> None:
        self.placement = placement

    @asynccontextmanager
    async def place(
        self, request: BuildRequest, avoid: Sequence[str] = ()
    ) -> AsyncIterator[str | None]:
        yield self.placement

    def blame(self, placement: str) -> None:
        return None


class DaemonHealth:
    """Which daemons answer `buildctl debug workers`, probed in the background."""

    def __init__(self, buildkit: BuildkitSettings, settings: SchedulingSettings) -> None:
        self.buildkit = buildkit
        self.addresses = [daemon.address for daemon in buildkit.daemons]
        self.settings = settings
        self._down: set[str] = set()

    def healthy(self) -> list[str]:
        return [address for address in self.addresses if address not in self._down]

    def mark_down(self, address: str) -> None:
        """A build saw this daemon fail; leave it out until a probe says otherwise."""
        if address not in self._down:
            logger.warning("daemon %s taken out of rotation", address)
            self._down.add(address)

    async def probe(self, address: str) -> bool:
        process = await asyncio.create_subprocess_exec(
            *self.buildkit.connection(address), "debug", "workers",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "TRACEPARENT": unsampled_traceparent()},  # no trace per probe
        )  # fmt: skip
        try:
            async with asyncio.timeout(self.settings.probe_timeout_s):
                return await process.wait() == 0
        except TimeoutError:
            process.kill()
            await process.wait()
            return False

    async def probe_all(self) -> None:
        results = await asyncio.gather(*(self.probe(a) for a in self.addresses))
        for address, ok in zip(self.addresses, results, strict=True):
            if ok and address in self._down:
                logger.info("daemon %s is back", address)
                self._down.discard(address)
            elif not ok:
                self.mark_down(address)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                await self.probe_all()
            await asyncio.sleep(self.settings.health_interval_s)


class LeasedPlacer:
    """Cache-affine placement with a per-daemon cap shared by the whole fleet."""

    def __init__(
        self,
        daemons: Sequence[DaemonSettings],
        capacity: Capacity,
        health: DaemonHealth,
        settings: SchedulingSettings,
    ) -> None:
        self.limits = {daemon.address: daemon.max_builds for daemon in daemons}
        self.capacity = capacity
        self.health = health
        self.settings = settings

    def blame(self, placement: str) -> None:
        self.health.mark_down(placement)

    def candidates(self, request: BuildRequest, avoid: Sequence[str]) -> list[str]:
        """Healthy daemons in rank order, the avoided ones last (or all, if none is healthy)."""
        ranked = rank(
            request.cache_key,
            self.health.healthy() or list(self.limits),
            strategy=self.settings.routing,
        )
        return [d for d in ranked if d not in avoid] + [d for d in ranked if d in avoid]

    @asynccontextmanager
    async def place(
        self, request: BuildRequest, avoid: Sequence[str] = ()
    ) -> AsyncIterator[str | None]:
        daemon = await self._wait_for_slot(request, avoid)
        try:
            yield daemon
        finally:
            await asyncio.shield(self.capacity.release(request.id))

    async def _wait_for_slot(self, request: BuildRequest, avoid: Sequence[str]) -> str:
        """A slot on one of the first `affinity_width` daemons in rank (where the build's
        cache is); when they stay full for `spill_after_s`, the first with room in rank.

        A cold build elsewhere costs the whole slow part of the build again, a short wait
        for a warm daemon usually costs less; past the wait, the load bound wins.
        """
        pause = 0.02
        spill_at = time.monotonic() + self.settings.spill_after_s
        while True:
            candidates = self.candidates(request, avoid)
            if time.monotonic() < spill_at:
                candidates = candidates[: self.settings.affinity_width]
            daemon = await self.capacity.acquire(
                request.id, [(d, self.limits[d]) for d in candidates]
            )
            if daemon is not None:
                return daemon
            # Full jitter, so that waiting workers do not retry in lockstep.
            await asyncio.sleep(random.uniform(0, pause))  # noqa: S311
            pause = min(pause * 2, self.settings.capacity_poll_max_s)
