"""The Python client: submit builds, follow them, cancel them.

async with BuildfleetClient.from_url("redis://127.0.0.1:6379/0") as fleet:
    build_id = await fleet.submit(request)
    async for event in fleet.watch(build_id):
        print(event)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Final, Self, TypeVar

import msgspec
from redis.asyncio import Redis

from producer import deadletters
from producer.connection import connect
from producer.contract import (
    TERMINAL_STATUSES,
    BuildEvent,
    BuildRequest,
    BuildResult,
    BuildState,
    CachePolicy,
    Cancelled,
    ContractError,
    DeadLettered,
    Failed,
    GitSource,
    LocalSource,
    Log,
    Queued,
    Retrying,
    Started,
    Step,
    Succeeded,
    decode_event,
    decode_request,
    event_kind,
    is_terminal,
    new_build_id,
    result_of,
)
from producer.errors import (
    BuildNotFound,
    FleetUnavailable,
    unavailable,
)
from producer.keys import (
    DEAD_LETTER_STREAM,
    EVENT_FIELD,
    EVENTS_STREAM,
    WORKERS,
    events_key,
    slot_key,
    waiting_key,
)
from producer.policy import RequestPolicy, check_request
from producer.resilience import RedisHealth, persistently
from producer.settings import QueueSettings, RedisSettings
from producer.store import PRIORITIES, BuildStore, CancelOutcome, Listed, Submission
from producer.workers import WORKER_STALE_S, DaemonBeat, WorkerBeat, worker_beat_decoder

# The Python client's public surface (pinned by tests/test_public_api.py): the client, what
# it takes and returns, and the errors it raises. Everything else in `producer` is internal.
__all__ = [
    "BuildEvent",
    "BuildNotFound",
    "BuildRequest",
    "BuildResult",
    "BuildState",
    "BuildfleetClient",
    "CachePolicy",
    "CancelOutcome",
    "Cancelled",
    "ContractError",
    "DaemonStatus",
    "DeadLetter",
    "DeadLettered",
    "Failed",
    "FleetStatus",
    "FleetUnavailable",
    "GitSource",
    "Listed",
    "LocalSource",
    "Log",
    "Queued",
    "Retrying",
    "Started",
    "Step",
    "Submission",
    "Succeeded",
    "WorkerStatus",
    "is_terminal",
    "new_build_id",
]

_BLOCK_MS: Final = 5_000
_T = TypeVar("_T")


class WorkerStatus(msgspec.Struct, frozen=True):
    name: str
    heartbeat_age_s: float
    builds: tuple[str, ...]
    backend: str
    concurrency: int


class DaemonStatus(msgspec.Struct, frozen=True):
    address: str
    healthy: bool
    """As the freshest worker that places builds on it last saw it."""
    in_flight: int
    capacity: int


class FleetStatus(msgspec.Struct, frozen=True):
    waiting: dict[str, int]
    """Builds waiting to start (or to retry), by priority."""
    running: int
    workers: tuple[WorkerStatus, ...]
    daemons: tuple[DaemonStatus, ...]
    dead_letters: int


class DeadLetter(msgspec.Struct, frozen=True):
    build_id: str
    reason: str
    at: float
    request: bytes
    """The request as it was queued (or the unreadable bytes that were); b"" if truncated."""
    truncated: bool = False
    """The request was over `[queue].dead_letter_max_bytes`: only its size was kept."""


class BuildfleetClient:
    """With a `policy`, every request is checked against it before it is submitted
    (producer.policy.PolicyError names the field): what the gateway does for API callers, a
    trusted producer can do for itself (`RequestPolicy.trusted()`)."""

    RECONNECT_PATIENCE_S: Final = 30.0
    """How long `watch`, `wait` and `tail` ride out Redis being away (a restart, a failover)
    before they give up with FleetUnavailable; they resume where they were."""

    def __init__(
        self,
        redis: Redis,
        queue: QueueSettings | None = None,
        *,
        policy: RequestPolicy | None = None,
    ) -> None:
        self.redis = redis
        self.store = BuildStore(redis, queue or QueueSettings())
        self.policy = policy
        self.health = RedisHealth(logging.getLogger("buildfleet.client"))

    @classmethod
    def connect(
        cls,
        redis: RedisSettings,
        queue: QueueSettings | None = None,
        *,
        policy: RequestPolicy | None = None,
    ) -> Self:
        """A client of the fleet configured by `redis` (URL, password, timeouts, Sentinel)."""
        return cls(connect(redis, Redis), queue, policy=policy)

    @classmethod
    def from_url(
        cls, url: str, queue: QueueSettings | None = None, *, policy: RequestPolicy | None = None
    ) -> Self:
        """A client for the fleet whose Redis is at `url` (see RedisSettings for the forms)."""
        return cls.connect(RedisSettings(url=url), queue, policy=policy)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's Redis connections (`async with` does this on exit)."""
        await self.redis.aclose()

    async def ping(self) -> None:
        """Returns once Redis answers; FleetUnavailable if it cannot be reached."""
        with unavailable("reach Redis"):
            await self.redis.ping()

    async def submit(self, request: BuildRequest) -> str:
        """Enqueue one build and return its id; the same id twice makes one build."""
        [submission] = await self.submit_many([request])
        return submission.build_id

    async def submit_many(self, requests: Sequence[BuildRequest]) -> list[Submission]:
        """Enqueue many builds in one round trip."""
        if self.policy is not None:
            for request in requests:
                check_request(request, self.policy)
        with unavailable("submit"):
            return await self.store.submit_many(requests)

    async def get(self, build_id: str) -> BuildState:
        """The build's current state; BuildNotFound when the fleet has no such build."""
        with unavailable("read build"):
            state = await self.store.state(build_id)
        if state is None:
            raise BuildNotFound(build_id)
        return state

    async def recent(self, tenant: str, count: int = 50) -> list[Listed]:
        """`tenant`'s newest builds (at most `count`, of the last RECENT_BUILDS_KEPT it
        submitted), newest first."""
        with unavailable("list builds"):
            return await self.store.recent(tenant, count)

    async def placements(self, daemons: Sequence[str]) -> dict[str, str]:
        """The daemon each running build holds a capacity slot on, by build id."""
        now_ms = int(time.time() * 1000)
        with unavailable("read placements"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for daemon in daemons:
                    pipe.zrangebyscore(slot_key(daemon), now_ms, "+inf")
                holders: list[list[bytes]] = await pipe.execute()
        return {
            member.decode().rpartition("#")[0]: daemon  # a holder is `{build_id}#{generation}`
            for daemon, members in zip(daemons, holders, strict=True)
            for member in members
        }

    async def cancel(self, build_id: str, reason: str = "cancelled by request") -> CancelOutcome:
        """Cancel the build: a queued one ends at once, a running one when its worker has
        stopped it. BuildNotFound when the fleet has no such build."""
        with unavailable("cancel"):
            outcome = await self.store.cancel(build_id, reason)
        if outcome is CancelOutcome.UNKNOWN:
            raise BuildNotFound(build_id)
        return outcome

    async def watch_entries(
        self, build_id: str, after: str = "0-0"
    ) -> AsyncIterator[tuple[str, BuildEvent]]:
        """Every event of one build with its stream id, from `after` until the terminal one.

        Replays what already happened first, so it also works for a build that has ended;
        the stream id lets a reader resume (Server-Sent Events' Last-Event-ID).
        """
        async for entry_id, data in self._entries(build_id, after):
            yield entry_id, decode_event(data)

    async def _entries(self, build_id: str, after: str) -> AsyncIterator[tuple[str, bytes]]:
        """The raw entries of a build's stream, up to and including the terminal one."""
        key = events_key(build_id)
        last_id = after
        response: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = []
        while True:
            if not response:
                # Checked again after every quiet read: a build lost with its stream (a
                # Redis failover can lose the last writes) ends the wait instead of hanging it.
                exists = functools.partial(self.redis.exists, key)
                with unavailable("watch"):
                    found = await self._patiently(exists, "watching a build")
                if not found:
                    raise BuildNotFound(build_id)
            read = functools.partial(self.redis.xread, {key: last_id}, block=_BLOCK_MS, count=500)
            with unavailable("watch"):
                response = await self._patiently(read, "watching a build")
            for _stream, entries in response:
                for entry_id, fields in entries:
                    last_id = entry_id.decode()
                    data = fields[EVENT_FIELD]
                    yield last_id, data
                    if event_kind(data) in TERMINAL_STATUSES:
                        return

    async def _patiently(self, read: Callable[[], Awaitable[_T]], doing: str) -> _T:
        return await persistently(
            read, health=self.health, doing=doing, patience_s=self.RECONNECT_PATIENCE_S
        )

    async def watch(self, build_id: str) -> AsyncIterator[BuildEvent]:
        """Every event of one build until (and including) its terminal event."""
        async for _entry_id, event in self.watch_entries(build_id):
            yield event

    async def tail(
        self, *, from_start: bool = False, after: str | None = None
    ) -> AsyncIterator[BuildEvent]:
        """The fleet-wide event stream, live: from now, from its oldest kept event
        (`from_start`), or from just after the entry `after` (see `last_event_id`)."""
        last_id = after or ("0-0" if from_start else "$")
        while True:
            read = functools.partial(self.redis.xread, {EVENTS_STREAM: last_id}, block=_BLOCK_MS)
            with unavailable("tail events"):
                response = await self._patiently(read, "tailing events")
            for _stream, entries in response:
                for entry_id, fields in entries:
                    last_id = entry_id
                    yield decode_event(fields[EVENT_FIELD])

    async def last_event_id(self) -> str:
        """Where the fleet-wide stream ends now: `tail(after=...)` misses nothing after it."""
        with unavailable("read events"):
            newest = await self.redis.xrevrange(EVENTS_STREAM, count=1)
        return newest[0][0].decode() if newest else "0-0"

    async def status(self, *, stale_after_s: float = WORKER_STALE_S) -> FleetStatus:
        """Builds waiting by priority and running, the live workers (a worker whose last
        heartbeat is older than `stale_after_s` is left out), the daemons with their
        health and load against capacity, and the dead letters kept."""
        with unavailable("read status"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for priority in PRIORITIES:
                    pipe.zcard(waiting_key(priority))
                pipe.hgetall(WORKERS)
                pipe.xlen(DEAD_LETTER_STREAM)
                *waiting, beats, dead = await pipe.execute()
            now = time.time()
            fresh = [
                beat
                for raw in beats.values()
                if now - (beat := worker_beat_decoder.decode(raw)).at <= stale_after_s
            ]
            daemons = _daemons(fresh)
            async with self.redis.pipeline(transaction=False) as pipe:
                for address in daemons:
                    pipe.zcount(slot_key(address), int(now * 1000), "+inf")
                loads = await pipe.execute()
        return FleetStatus(
            waiting=dict(zip(PRIORITIES, waiting, strict=True)),
            running=sum(len(beat.builds) for beat in fresh),
            workers=tuple(
                WorkerStatus(
                    name=beat.name,
                    heartbeat_age_s=round(max(0.0, now - beat.at), 3),
                    builds=beat.builds,
                    backend=beat.backend,
                    concurrency=beat.concurrency,
                )
                for beat in sorted(fresh, key=lambda beat: beat.name)
            ),
            daemons=tuple(
                DaemonStatus(address, daemon.healthy, load, daemon.capacity)
                for (address, daemon), load in zip(daemons.items(), loads, strict=True)
            ),
            dead_letters=dead,
        )

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The newest dead-lettered builds, newest first, with their full requests."""
        with unavailable("read dead letters"):
            entries = await self.redis.xrevrange(DEAD_LETTER_STREAM, count=count)
        return [
            DeadLetter(
                build_id=fields[b"build_id"].decode(),
                reason=fields[b"reason"].decode(errors="replace"),
                at=float(fields[b"at"]),
                request=fields[b"request"],
                truncated=deadletters.TRUNCATED in fields,
            )
            for _entry_id, fields in entries
        ]

    async def replay(self, build_id: str) -> str:
        """Submit a dead-lettered build again, as a new build labelled `replay-of`."""
        for letter in await self.dead_letters(count=10_000):
            if letter.build_id == build_id:
                if letter.truncated:
                    raise ContractError(
                        f"dead letter {build_id}: its request was over the dead-letter cap and "
                        "was not kept, so it cannot be replayed"
                    )
                original = decode_request(letter.request)
                again = msgspec.structs.replace(
                    original,
                    id=new_build_id(),
                    submitted_at=0.0,
                    labels={**original.labels, "replay-of": build_id},
                )
                return await self.submit(again)
        raise BuildNotFound(build_id)

    async def wait(self, build_id: str) -> BuildResult:
        """The result, once the build has ended."""
        async for _entry_id, data in self._entries(build_id, "0-0"):
            if event_kind(data) in TERMINAL_STATUSES:
                result = result_of(decode_event(data))
                assert result is not None
                return result
        raise BuildNotFound(build_id)


def _daemons(beats: Sequence[WorkerBeat]) -> dict[str, DaemonBeat]:
    """Every daemon the workers place builds on, as the freshest heartbeat naming it says."""
    daemons: dict[str, DaemonBeat] = {}
    for beat in sorted(beats, key=lambda beat: beat.at):
        daemons.update(beat.daemons)
    return dict(sorted(daemons.items()))
