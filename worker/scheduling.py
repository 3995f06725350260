"""Where a build runs: the placer picks a daemon and holds one of its capacity slots.

`LeasedPlacer` ranks the healthy daemons for the build's cache key (worker.routing), takes
a slot in that order (worker.capacity, atomic in Redis): on the daemon holding its cache
if one frees within `spill_after_s`, else on the first with room (the load bound), waiting
with backoff while every daemon is full. `DaemonHealth` probes
each daemon with its backend's probe (`buildctl debug workers`, the Engine API's
`GET /_ping`); a daemon that fails is left out until a probe succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from producer.contract import BuildRequest
from producer.resilience import persistently
from worker.capacity import Capacity
from worker.routing import rank
from worker.settings import DaemonSettings, SchedulingSettings

logger = logging.getLogger("buildfleet.scheduling")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an attempt builds: a daemon (or namespace) and its cap, or nowhere in
    particular (no capacity accounting)."""

    daemon: str | None
    limit: int = 0


class Placer(Protocol):
    def offer(self, request: BuildRequest, avoid: Sequence[str] = ()) -> list[tuple[str, int]]:
        """The places (with their caps) an attempt should try first, as it starts: a slot
        on one of them is taken in the same step as the start."""
        ...

    async def wait(
        self, request: BuildRequest, holder: str, avoid: Sequence[str], since: float
    ) -> Placement:
        """Wait for room (the attempt has waited since `since`, monotonic), then hold it
        for `holder`.

        `avoid` names places that failed this build before: they are used only when
        nothing else is available.
        """
        ...

    def placed(self, daemon: str | None) -> Placement:
        """The placement for a slot taken on `daemon` as the attempt started."""
        ...

    async def release(self, placement: Placement, holder: str) -> None:
        """Free what `holder` holds (when no terminal event frees it)."""
        ...

    def blame(self, placement: str) -> None:
        """A build failed because of this place (a daemon lost, say)."""
        ...


class FixedPlacer:
    """Every build goes to one place, with no capacity accounting (simulate, benchmarks)."""

    def __init__(self, placement: str | None) -> None:
        self.placement = placement

    def offer(self, request: BuildRequest, avoid: Sequence[str] = ()) -> list[tuple[str, int]]:
        return []

    async def wait(
        self, request: BuildRequest, holder: str, avoid: Sequence[str], since: float
    ) -> Placement:
        return Placement(self.placement)

    def placed(self, daemon: str | None) -> Placement:
        return Placement(daemon)

    async def release(self, placement: Placement, holder: str) -> None:
        return None

    def blame(self, placement: str) -> None:
        return None


HealthProbe = Callable[[str], Awaitable[bool]]
"""Whether the daemon at an address answers (a backend's `probe`)."""


class DaemonHealth:
    """Which daemons answer their backend's probe, probed in the background."""

    def __init__(
        self,
        addresses: Sequence[str],
        settings: SchedulingSettings,
        probe: HealthProbe | None = None,
    ) -> None:
        self.addresses = list(addresses)
        self.settings = settings
        self.probe = probe
        """None: nothing is probed; a daemon leaves rotation only when a build blames it."""
        self._down: set[str] = set()

    def healthy(self) -> list[str]:
        return [address for address in self.addresses if address not in self._down]

    def mark_down(self, address: str) -> None:
        """A build saw this daemon fail; leave it out until a probe says otherwise."""
        if address not in self._down:
            logger.warning("daemon %s taken out of rotation", address)
            self._down.add(address)

    async def _answers(self, address: str) -> bool:
        if self.probe is None:
            return True
        try:
            async with asyncio.timeout(self.settings.probe_timeout_s):
                return await self.probe(address)
        except TimeoutError:
            return False

    async def probe_all(self) -> None:
        results = await asyncio.gather(*(self._answers(a) for a in self.addresses))
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

    def offer(self, request: BuildRequest, avoid: Sequence[str] = ()) -> list[tuple[str, int]]:
        candidates = self.candidates(request, avoid)
        if self.settings.spill_after_s > 0:
            candidates = candidates[: self.settings.affinity_width]
        return [(d, self.limits[d]) for d in candidates]

    def placed(self, daemon: str | None) -> Placement:
        return Placement(daemon, self.limits.get(daemon, 0) if daemon else 0)

    async def release(self, placement: Placement, holder: str) -> None:
        if placement.daemon is not None:
            await self.capacity.release(placement.daemon, holder)

    async def wait(
        self, request: BuildRequest, holder: str, avoid: Sequence[str], since: float
    ) -> Placement:
        """A slot on one of the first `affinity_width` daemons in rank (where the build's
        cache is); when they stay full until `spill_after_s` after `since`, the first with
        room in rank.

        A cold build elsewhere costs the whole slow part of the build again, a short wait
        for a warm daemon usually costs less; past the wait, the load bound wins.
        """
        pause = 0.02
        spill_at = since + self.settings.spill_after_s
        while True:
            candidates = self.candidates(request, avoid)
            if time.monotonic() < spill_at:
                candidates = candidates[: self.settings.affinity_width]
            ranked = [(d, self.limits[d]) for d in candidates]
            daemon = await persistently(
                functools.partial(self.capacity.acquire, holder, ranked),
                health=self.capacity.health,
                doing="taking a capacity slot",
            )
            if daemon is not None:
                return self.placed(daemon)
            # Full jitter, so that waiting workers do not retry in lockstep.
            await asyncio.sleep(random.uniform(0, pause))  # noqa: S311
            pause = min(pause * 2, self.settings.capacity_poll_max_s)
