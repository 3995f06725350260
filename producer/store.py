"""Every build's record in Redis, and the only code that changes it.

Per build: a hash `buildfleet:build:{id}` (request, status, attempt, lease generation,
result, cancel request) and a stream `buildfleet:build:{id}:events` that `watch` replays;
fleet-wide: the capped stream `buildfleet:events` and the index of builds that have not
ended; per tenant: a capped index of its newest builds. Each transition is one Lua script
(producer/lua/), so a status change and its event are written together. Invariants:

- A build that has ended refuses every later event: exactly one terminal event, whatever
  races (a cancel, a timeout, a worker coming back from a pause).
- Each attempt starts by taking a new lease generation; its token (build id, attempt,
  generation) goes with everything it publishes, and a token that is not the record's
  current one is refused (FENCED): a worker that lost its lease can change nothing.
- A terminal event drops the lease and frees the attempt's capacity slot in the same
  step, so a slot is never held by a build that has ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, cast

import msgspec
from redis.asyncio import Redis

from producer import deadletters, jobcodec, lua
from producer.batching import Coalescer
from producer.contract import (
    BuildEvent,
    BuildRequest,
    BuildResult,
    BuildState,
    Cancelled,
    ContractError,
    DeadLettered,
    Queued,
    Retrying,
    Started,
    Status,
    decode_request,
    decode_result,
    encode,
    result_of,
)
from producer.fields import Priority
from producer.keys import (
    ACTIVE_BUILDS,
    CANCEL_CHANNEL,
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    build_key,
    events_key,
    in_progress_key,
    job_key,
    lease_key,
    queued_channel,
    tenant_recent_key,
    waiting_key,
)
from producer.lua import Arg, Frame, ScriptCall
from producer.resilience import is_transient
from producer.settings import QueueSettings

logger = logging.getLogger("buildfleet.store")

# A record outlives its build's longest plausible wait in the queue; it is shortened to the
# result TTL when the build ends.
PENDING_TTL_S: Final = 30 * 24 * 3600
RECENT_BUILDS_KEPT: Final = 1000
SUBMIT_CHUNK: Final = 500
"""The most builds one Lua call enqueues."""
"""How many of a tenant's newest builds its index of recent builds keeps (what the web view
can list)."""
PRIORITIES: Final[tuple[Priority, ...]] = ("interactive", "batch")
_WAITING_KEYS: Final = tuple(waiting_key(priority) for priority in PRIORITIES)


class CancelOutcome(Enum):
    CANCELLED = "cancelled"
    """It was still queued and has ended with Cancelled."""
    SIGNALLED = "signalled"
    """It is running; its worker stops it and publishes Cancelled."""
    ENDED = "ended"
    """It had already ended; nothing changed."""
    LEFT_RUNNING = "left_running"
    """It had started, and only queued builds were to be cancelled."""
    UNKNOWN = "unknown"


class PublishOutcome(Enum):
    PUBLISHED = 1
    ALREADY_ENDED = 0
    CANCEL_REQUESTED = -1
    """(starting only) A cancel was recorded before the attempt could start."""
    FENCED = -2
    """A newer attempt of the build has started: this one may change nothing."""


@dataclass(frozen=True, slots=True)
class AttemptToken:
    """An attempt's right to change its build: the lease generation its start took."""

    build_id: str
    attempt: int
    generation: int

    @property
    def holder(self) -> str:
        """What holds the attempt's capacity slot: two attempts never share or free one."""
        return f"{self.build_id}#{self.generation}"


@dataclass(frozen=True, slots=True)
class Begun:
    """An attempt has started: its token, and which of the offered slot sets it holds a
    slot on (0: none offered had room)."""

    token: AttemptToken
    slot: int


class CancelNotice(msgspec.Struct, frozen=True):
    """What workers hear on the cancel channel, and what the record keeps."""

    build_id: str
    reason: str


cancel_notice_decoder: Final = msgspec.json.Decoder(CancelNotice)


@dataclass(frozen=True, slots=True)
class Submission:
    build_id: str
    created: bool
    """False when a build with this id already existed: submitting is idempotent."""


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """A dead letter to keep with a terminal DeadLettered event (the request as queued, or
    the unreadable bytes that were)."""

    request: bytes


class BuildStore:
    """Reads and writes build records; shared by producers and workers."""

    def __init__(self, redis: Redis, queue: QueueSettings) -> None:
        self.redis = redis
        self.queue = queue
        # One batch at a time, in order: a later publish never overtakes an earlier one.
        self._publishes: Coalescer[ScriptCall, PublishOutcome] = Coalescer(
            self._publish_batch, serial=True
        )
        # The attempts a worker starts in one event-loop turn share a round trip.
        self._starts: Coalescer[ScriptCall, list[int]] = Coalescer(self._start_batch)

    # --- producers -------------------------------------------------------------------

    def score_ms(self, request: BuildRequest, now_ms: int) -> int:
        """Where a request goes in the queue: interactive builds get a head start."""
        if request.priority == "interactive":
            return now_ms - int(self.queue.interactive_head_start_s * 1000)
        return now_ms

    async def submit_many(self, requests: Sequence[BuildRequest]) -> list[Submission]:
        """Enqueue every request in one round trip, a Lua call per `SUBMIT_CHUNK` of them
        (so that a long list does not hold Redis in one script); an id that exists already
        is left as is.

        A request asking for a timeout beyond the fleet's maximum is refused (ContractError)
        before anything is written."""
        shared = self.submit_shared()
        calls: list[ScriptCall] = []
        for start in range(0, len(requests), SUBMIT_CHUNK):
            builds = self.submitting(requests[start : start + SUBMIT_CHUNK])
            calls.append((lua.SUBMIT, shared.keys + builds.keys, shared.args + builds.args))
        replies = cast(list[list[int]], await lua.run_all(self.redis, calls))
        created = [flag for reply in replies for flag in reply]
        return [
            Submission(request.id, bool(flag))
            for request, flag in zip(requests, created, strict=True)
        ]

    def submit_shared(self) -> Frame:
        """What submit.lua takes before its builds: the fleet-wide keys (the queued channel
        last) and settings that `submit_builds` (lua/common.lua) shares among them."""
        keys = [EVENTS_STREAM, self.queue.name, ACTIVE_BUILDS, queued_channel(self.queue.name)]
        args: list[Arg] = [
            PENDING_TTL_S * 1000,
            PENDING_TTL_S,
            self.queue.events_maxlen,
            RECENT_BUILDS_KEPT,
        ]
        return Frame(keys, args)

    def submitting(self, requests: Sequence[BuildRequest]) -> Frame:
        """The keys and arguments of each build for `submit_builds` (lua/common.lua), for
        submit.lua and for scripts that enqueue builds as one of their steps. Raises
        ContractError for a timeout beyond the fleet's maximum."""
        for request in requests:
            if request.timeout_s is not None and request.timeout_s > self.queue.max_timeout_s:
                raise ContractError(
                    f"invalid build request: timeout_s {request.timeout_s:g} is above the "
                    f"fleet's maximum of {self.queue.max_timeout_s:g} seconds - at `$.timeout_s`"
                )
        now = time.time()
        now_ms = int(now * 1000)
        keys: list[str] = []
        args: list[Arg] = []
        for request in requests:
            stamped = request if request.submitted_at else _with_submitted_at(request, now)
            request_json = encode(stamped)
            queued = Queued(build_id=request.id, at=now, priority=request.priority)
            keys += [
                build_key(request.id),
                events_key(request.id),
                job_key(request.id),
                waiting_key(request.priority),
                tenant_recent_key(request.tenant),
            ]
            args += [
                request.id,
                request_json,
                encode(queued),
                *jobcodec.envelope_around(request_json, now_ms),
                self.score_ms(request, now_ms),
                int(stamped.submitted_at * 1000),
            ]
        return Frame(keys, args)

    async def cancel(self, build_id: str, reason: str) -> CancelOutcome:
        [outcome] = await self.cancel_many([(build_id, reason)])
        return outcome

    async def cancel_many(
        self, cancels: Sequence[tuple[str, str]], *, only_queued: bool = False
    ) -> list[CancelOutcome]:
        """Cancel (build id, reason) pairs in one round trip. With `only_queued`, a build
        that is running is left running (CancelOutcome.LEFT_RUNNING)."""
        calls: list[ScriptCall] = []
        for build_id, reason in cancels:
            keys, args = self.cancelling(build_id, reason)
            calls.append((lua.CANCEL, keys, [*args, "1" if only_queued else ""]))
        return [CancelOutcome(_text(reply)) for reply in await lua.run_all(self.redis, calls)]

    def cancelling(self, build_id: str, reason: str) -> tuple[list[str], list[Arg]]:
        """The KEYS and ARGV of `cancel_build` (lua/common.lua) but its last, only_queued."""
        result = BuildResult(
            build_id=build_id, status="cancelled", error=reason, finished_at=time.time()
        )
        event = Cancelled(build_id=build_id, result=result, reason=reason)
        keys = [
            build_key(build_id),
            events_key(build_id),
            EVENTS_STREAM,
            self.queue.name,
            job_key(build_id),
            CANCEL_CHANNEL,
            ACTIVE_BUILDS,
            *_WAITING_KEYS,
        ]
        args: list[Arg] = [
            build_id,
            encode(event),
            encode(result),
            self.queue.result_ttl_s,
            self.queue.events_maxlen,
            encode(CancelNotice(build_id=build_id, reason=reason)),
        ]
        return keys, args

    async def cancel_requests(self, build_ids: Sequence[str]) -> list[CancelNotice]:
        """The cancels recorded for these builds."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for build_id in build_ids:
                pipe.hget(build_key(build_id), "cancel")
            flags: list[bytes | None] = await pipe.execute()
        return [cancel_notice_decoder.decode(flag) for flag in flags if flag]

    async def state(self, build_id: str) -> BuildState | None:
        fields: list[bytes | None] = await self.redis.hmget(  # type: ignore[misc]
            build_key(build_id), _STATE_FIELDS
        )
        listed = _listed(build_id, fields)
        return listed.state if listed else None

    async def recent(self, tenant: str, count: int) -> list[Listed]:
        """A tenant's `count` newest builds, newest first (two round trips); a build whose
        record has expired is left out."""
        raw_ids: list[bytes] = await self.redis.zrevrange(tenant_recent_key(tenant), 0, count - 1)
        build_ids = [raw.decode() for raw in raw_ids]
        async with self.redis.pipeline(transaction=False) as pipe:
            for build_id in build_ids:
                pipe.hmget(build_key(build_id), _STATE_FIELDS)
            rows: list[list[bytes | None]] = await pipe.execute()
        found = (_listed(build_id, row) for build_id, row in zip(build_ids, rows, strict=True))
        return [listed for listed in found if listed is not None]

    # --- workers ---------------------------------------------------------------------

    async def start(
        self,
        started: Started,
        priority: Priority,
        *,
        lease_s: float,
        slots: Sequence[tuple[str, int]] = (),
        slot_ttl_s: float = 0.0,
    ) -> Begun | PublishOutcome:
        """Start an attempt: a new lease generation, the lease, status running, Started;
        and a capacity slot on the first of `slots` (slot set, limit) with room.

        Returns the attempt's token, or ALREADY_ENDED / CANCEL_REQUESTED (nothing changed).
        """
        now_ms = int(time.time() * 1000)
        keys = [
            build_key(started.build_id),
            events_key(started.build_id),
            EVENTS_STREAM,
            lease_key(started.build_id),
            waiting_key(priority),
            *(key for key, _ in slots),
        ]
        args: list[Arg] = [
            started.build_id,
            encode(started),
            started.attempt,
            started.worker,
            int(lease_s * 1000),
            self.queue.events_maxlen,
            PENDING_TTL_S,
            now_ms,
            now_ms + int(slot_ttl_s * 1000),
            *(limit for _, limit in slots),
        ]
        reply = await self._starts((lua.START, keys, args))
        if reply[0] != 1:
            return PublishOutcome(int(reply[0]))
        token = AttemptToken(started.build_id, started.attempt, int(reply[1]))
        return Begun(token, int(reply[2]))

    async def publish(
        self,
        event: BuildEvent,
        token: AttemptToken | None = None,
        *,
        slot: str | None = None,
        dead_letter: DeadLetterEntry | None = None,
    ) -> PublishOutcome:
        """Append an event to the build's stream and the fleet's; a terminal event moves
        the build to its status and result, drops `token`'s lease, frees its slot in the
        slot set `slot`, keeps `dead_letter`, and finishes the build's arq job (what
        arq's `finish_job` does: the worker running it need not).

        Publishes issued while a round trip is under way go together in the next one, in
        order: a worker running many builds pays one round trip per batch, not per event.
        """
        return await self._publishes(self._publish_call(event, token, slot, dead_letter))

    def publish_soon(self, event: BuildEvent, token: AttemptToken | None = None) -> None:
        """Queue a progress event without waiting for it; it still lands before anything the
        same process publishes after it. A failure is logged: progress is not worth a stall."""
        queued = self._publishes.enqueue(self._publish_call(event, token, None, None))
        queued.add_done_callback(_log_if_failed)

    def _publish_call(
        self,
        event: BuildEvent,
        token: AttemptToken | None,
        slot: str | None,
        dead_letter: DeadLetterEntry | None,
    ) -> ScriptCall:
        result = result_of(event)
        keys = [
            build_key(event.build_id),
            events_key(event.build_id),
            EVENTS_STREAM,
            lease_key(event.build_id),
            ACTIVE_BUILDS,
            slot or "",
            DEAD_LETTER_STREAM,
            *_WAITING_KEYS,
            self.queue.name,
            job_key(event.build_id),
            in_progress_key(event.build_id),
        ]
        args: list[Arg] = [
            event.build_id,
            encode(event),
            "" if result is None else result.status,
            b"" if result is None else encode(result),
            "" if token is None else token.generation,
            self.queue.events_maxlen,
            self.queue.result_ttl_s,
            PENDING_TTL_S,
            token.holder if token is not None and slot else "",
            self._dead_letters_maxlen,
        ]
        if dead_letter is not None and result is not None:
            reason = result.error or result.status
            args += self._dead_letter_fields(event.build_id, reason, dead_letter.request)
        return (lua.PUBLISH, keys, args)

    @property
    def _dead_letters_maxlen(self) -> int:
        return deadletters.maxlen(
            self.queue.dead_letters_max_bytes, self.queue.dead_letter_max_bytes
        )

    def _dead_letter_fields(self, build_id: str, reason: str, request: bytes) -> list[Arg]:
        """A dead letter's stream entry, as a flat list of field names and values."""
        fields = deadletters.entry(
            build_id, reason, time.time(), request, self.queue.dead_letter_max_bytes
        )
        return [item for pair in fields.items() for item in pair]

    async def _publish_batch(self, calls: list[ScriptCall]) -> list[PublishOutcome | Exception]:
        # Together: a watcher wakes once to a build's last progress and its end.
        replies = await lua.run_scripts(self.redis, calls, together=True)
        return [
            reply if isinstance(reply, Exception) else PublishOutcome(int(reply))
            for reply in replies
        ]

    async def _start_batch(self, calls: list[ScriptCall]) -> list[list[int] | Exception]:
        return cast(list[list[int] | Exception], await lua.run_scripts(self.redis, calls))

    async def reschedule(
        self,
        event: Retrying,
        request: BuildRequest,
        token: AttemptToken,
        *,
        next_attempt: int,
        avoid: Sequence[str] = (),
        retry_since: float = 0.0,
        slot: str | None = None,
    ) -> PublishOutcome:
        """Publish Retrying and rewrite the queued job so that it runs as `next_attempt`,
        away from the daemons in `avoid` when others are available, at the event's
        `next_attempt_at`; free the slot and the worker's claim on the job."""
        now_ms = int(time.time() * 1000)
        envelope = jobcodec.build_envelope(
            encode(request), now_ms, next_attempt, avoid, retry_since
        )
        keys = [
            build_key(event.build_id),
            events_key(event.build_id),
            EVENTS_STREAM,
            job_key(event.build_id),
            lease_key(event.build_id),
            slot or "",
            waiting_key(request.priority),
            self.queue.name,
            in_progress_key(event.build_id),
        ]
        args: list[Arg] = [
            event.build_id,
            encode(event),
            next_attempt,
            envelope,
            self.queue.events_maxlen,
            token.generation,
            token.holder if slot else "",
            self.score_ms(request, now_ms),
            int(event.next_attempt_at * 1000),
        ]
        reply = await lua.run(self.redis, lua.RESCHEDULE, keys, args)
        return PublishOutcome(int(cast(int, reply)))

    async def requeue_lost(self, build_id: str, *, max_requeues: int) -> str:
        """Put a build whose job was lost back in the queue (or, past `max_requeues`, end it
        dead-lettered). Returns "requeued", "dead_lettered", or "alive" when it turned out
        to have a job, a lease or an end after all (nothing changed)."""
        fields: list[bytes | None] = await self.redis.hmget(  # type: ignore[misc]
            build_key(build_id), ["request", "attempt"]
        )
        raw, attempt_text = fields
        if raw is None:
            return "alive"
        request = decode_request(raw)
        attempt = int(attempt_text or 1)
        now = time.time()
        now_ms = int(now * 1000)
        reason = "its job was lost (a worker could not record how its attempt ended)"
        retrying = Retrying(
            build_id=build_id, attempt=attempt, reason=f"{reason}; re-queued", error_class="lost"
        )
        result = BuildResult(
            build_id=build_id,
            status="dead_lettered",
            images=request.images,
            attempts=attempt,
            error_class="lost",
            error=f"{reason}, {max_requeues} times",
            finished_at=now,
        )
        dead = DeadLettered(build_id=build_id, attempt=attempt, result=result, reason=reason)
        keys = [
            build_key(build_id),
            events_key(build_id),
            EVENTS_STREAM,
            job_key(build_id),
            self.queue.name,
            lease_key(build_id),
            ACTIVE_BUILDS,
            DEAD_LETTER_STREAM,
            waiting_key(request.priority),
        ]
        args: list[Arg] = [
            build_id,
            jobcodec.build_envelope(raw, now_ms, attempt),
            self.score_ms(request, now_ms),
            encode(retrying),
            PENDING_TTL_S * 1000,
            self.queue.events_maxlen,
            max_requeues,
            encode(dead),
            encode(result),
            self.queue.result_ttl_s,
            self._dead_letters_maxlen,
            *self._dead_letter_fields(build_id, result.error or reason, raw),
        ]
        reply = int(cast(int, await lua.run(self.redis, lua.REQUEUE, keys, args)))
        return {1: "requeued", 2: "dead_lettered"}.get(reply, "alive")

    async def lost_builds(self, build_ids: Sequence[str]) -> list[str]:
        """Those of `build_ids` that have not ended and have neither a job, a place in the
        queue nor a lease; builds that ended or expired leave the index of live builds."""
        keys = [self.queue.name, ACTIVE_BUILDS]
        for build_id in build_ids:
            keys += [build_key(build_id), job_key(build_id), lease_key(build_id)]
        reply = cast(list[bytes], await lua.run(self.redis, lua.ORPHANS, keys, build_ids))
        return [_text(item) for item in reply]


def _log_if_failed(outcome: asyncio.Future[PublishOutcome]) -> None:
    """Progress is best effort: a lost event is logged (quietly while Redis is away)."""
    if outcome.cancelled() or (exc := outcome.exception()) is None:
        return
    log = logger.debug if is_transient(exc) else logger.warning
    log("a progress event was not published: %s", exc)


_STATE_FIELDS: Final = ["status", "attempt", "request", "result", "started_ms"]


@dataclass(frozen=True, slots=True)
class Listed:
    """A build's state, and when its latest attempt started (None before any did)."""

    state: BuildState
    started_at: float | None


def _listed(build_id: str, fields: Sequence[bytes | None]) -> Listed | None:
    status, attempt, request, result, started_ms = fields
    if status is None:
        return None
    state = BuildState(
        build_id=build_id,
        status=cast(Status, status.decode()),
        attempt=int(attempt or 1),
        request=decode_request(request) if request else None,
        result=decode_result(result) if result else None,
    )
    return Listed(state, int(started_ms) / 1000 if started_ms else None)


def _with_submitted_at(request: BuildRequest, now: float) -> BuildRequest:
    return msgspec.structs.replace(request, submitted_at=now)


def _text(reply: object) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)
