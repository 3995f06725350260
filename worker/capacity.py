"""Capacity slots and build leases in Redis, shared by every worker process everywhere.

A daemon's slots are a sorted set `buildfleet:slots:{daemon}` of holders scored by expiry;
a holder is one attempt (`{build id}#{lease generation}`), so two runs of a build never
share a slot or free each other's. Taking a slot is a Lua script that drops expired holders
and walks the daemons in rank order, so two workers can never both take a daemon's last
slot. A running attempt's lease `buildfleet:build:{id}:lease` is taken when it starts and
dropped when it ends (producer/store.py).

One heartbeat per worker renews every lease and slot it holds in one round trip, and
hears back what it must act on: an attempt another worker has taken over (fenced: stop it
now, publish nothing), a slot lost while Redis was away and the daemon filled up (stop it),
or a cancel the worker missed on the channel. A lease that lapsed while Redis was away is
re-created by its rightful holder. The heartbeat also records the worker as alive, with
what it runs, for `buildfleet status`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import msgspec
from redis.asyncio import Redis

from producer import lua
from producer.keys import WORKERS, build_key, lease_key, slot_key
from producer.lua import Arg
from producer.resilience import RedisHealth, persistently
from producer.store import AttemptToken, CancelNotice, cancel_notice_decoder
from producer.workers import WorkerBeat, worker_beat_encoder
from worker.settings import SchedulingSettings

logger = logging.getLogger("buildfleet.capacity")


@dataclass
class Held:
    """One running attempt's lease (and slot, once it has one), as the heartbeat keeps it."""

    token: AttemptToken
    slot: str | None = None
    limit: int = 0
    valid_until: float = 0.0
    """Monotonic time until which the lease is surely this worker's: the send time of the
    last renewal that succeeded, plus the shorter of the lease and slot TTLs."""
    renewed: asyncio.Event = field(default_factory=asyncio.Event)

    async def confirmed(self) -> None:
        """Return once the lease is surely this worker's again (a renewal succeeded after
        `valid_until` passed); when another attempt takes over, the runner cancels the
        caller instead."""
        while time.monotonic() >= self.valid_until:
            self.renewed.clear()
            await self.renewed.wait()


class HeartbeatListener(Protocol):
    """What the runner hears from the heartbeat."""

    def lost(self, build_id: str, why: str) -> None:
        """The attempt lost its lease (or its slot): stop it, publish nothing for it."""

    def cancel(self, build_id: str, reason: str) -> bool:
        """A cancel the worker missed on the channel."""
        ...


class Capacity:
    """This worker's slots and leases, and the heartbeat that keeps them."""

    def __init__(
        self,
        redis: Redis,
        settings: SchedulingSettings,
        *,
        worker: str = "",
        health: RedisHealth | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.worker = worker
        self.health = health or RedisHealth()
        self._held: dict[str, Held] = {}

    @property
    def lease_window_s(self) -> float:
        """How long a renewal keeps both the lease and the slot."""
        return min(self.settings.lease_ttl_s, self.settings.slot_ttl_s)

    async def acquire(self, holder: str, ranked: Sequence[tuple[str, int]]) -> str | None:
        """Take a slot on the first daemon in `ranked` (daemon, max_builds) with room."""
        now_ms = int(time.time() * 1000)
        keys = [slot_key(daemon) for daemon, _ in ranked]
        expiry_ms = now_ms + int(self.settings.slot_ttl_s * 1000)
        args: list[Arg] = [now_ms, expiry_ms, holder, *(limit for _, limit in ranked)]
        index = int(cast(int, await lua.run(self.redis, lua.ACQUIRE, keys, args)))
        return ranked[index - 1][0] if index else None

    async def release(self, daemon: str, holder: str) -> None:
        await self.redis.zrem(slot_key(daemon), holder)

    def hold(self, token: AttemptToken) -> Held:
        """Keep an attempt's lease (taken by its start) renewed from now on."""
        held = Held(token, valid_until=time.monotonic() + self.lease_window_s)
        self._held[token.build_id] = held
        return held

    def holds_slot(self, token: AttemptToken, daemon: str, limit: int) -> None:
        held = self._held.get(token.build_id)
        if held is not None and held.token == token:
            held.slot, held.limit = slot_key(daemon), limit

    def drop(self, token: AttemptToken) -> None:
        held = self._held.get(token.build_id)
        if held is not None and held.token == token:
            del self._held[token.build_id]

    async def heartbeat(
        self, listener: HeartbeatListener, describe: Callable[[], WorkerBeat]
    ) -> None:
        """Renew every slot and lease this worker holds, until cancelled."""
        interval = self.lease_window_s / 3
        while True:
            await persistently(
                lambda: self.renew(listener, describe()),
                health=self.health,
                doing="renewing leases",
            )
            await asyncio.sleep(interval)

    async def renew(self, listener: HeartbeatListener, beat: WorkerBeat) -> None:
        """One heartbeat: renew, record the worker, act on what Redis says."""
        held = list(self._held.values())
        sent = time.monotonic()
        now_ms = int(time.time() * 1000)
        keys: list[str] = [WORKERS]
        args: list[Arg] = [
            int(self.settings.lease_ttl_s * 1000),
            now_ms,
            now_ms + int(self.settings.slot_ttl_s * 1000),
            beat.name,
            worker_beat_encoder.encode(beat),
        ]
        for item in held:
            token = item.token
            keys += [build_key(token.build_id), lease_key(token.build_id), item.slot or ""]
            args += [token.generation, f"{self.worker} {token.generation}", "", 0]
            if item.slot:
                args[-2:] = [token.holder, item.limit]
        replies = cast(list[object], await lua.run(self.redis, lua.RENEW, keys, args))
        for item, reply in zip(held, replies, strict=True):
            self._act(listener, item, reply, sent)

    def _act(self, listener: HeartbeatListener, item: Held, reply: object, sent: float) -> None:
        build_id = item.token.build_id
        if self._held.get(build_id) is not item:
            return  # it ended while the heartbeat was under way
        match reply:
            case 0:
                listener.lost(build_id, "another attempt took over its lease")
            case 2:
                listener.lost(build_id, "its capacity slot lapsed and the daemon is full")
            case bytes() as notice:
                item.valid_until = sent + self.lease_window_s
                item.renewed.set()
                cancel = cancel_notice_decoder.decode(notice)
                listener.cancel(cancel.build_id, cancel.reason)
            case _:
                item.valid_until = sent + self.lease_window_s
                item.renewed.set()

    async def leave(self) -> None:
        """Say this worker is gone (a clean stop), so `status` stops listing it."""
        await self.redis.hdel(WORKERS, self.worker)  # type: ignore[misc]


def decode_notice(data: bytes) -> CancelNotice | None:
    """A cancel notice from the channel, or None when it is malformed (logged)."""
    try:
        return cancel_notice_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        logger.warning("ignoring a malformed cancel notice (%s): %r", exc, data[:200])
        return None
