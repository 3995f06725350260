"""Every build's record in Redis, and the only code that changes it.

Per build: a hash `buildfleet:build:{id}` (request, status, attempt, result) and a stream
`buildfleet:build:{id}:events` that `watch` replays; fleet-wide: the capped stream
`buildfleet:events`. Each transition is one Lua script, so a status change and its event
are written together, and a build that has ended refuses every later event: that is what
makes "exactly one terminal event" hold when a cancel, a timeout and a worker race.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, cast

import msgspec
from redis.asyncio import Redis

from producer import jobcodec
from producer.contract import (
    BuildEvent,
    BuildRequest,
    BuildResult,
    BuildState,
    Cancelled,
    DeadLettered,
    Queued,
    Retrying,
    Status,
    decode_request,
    decode_result,
    encode,
    is_terminal,
)
from producer.keys import (
    CANCEL_CHANNEL,
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    build_key,
    events_key,
    job_key,
    lease_key,
)
from producer.lua import ScriptCall, run_scripts
from producer.settings import QueueSettings

logger = logging.getLogger("buildfleet.store")

# A record outlives its build's longest plausible wait in the queue; it is shortened to the
# result TTL when the build ends.
_PENDING_TTL_S: Final = 30 * 24 * 3600

_TERMINAL_LUA: Final = """
local terminal = {succeeded=true, failed=true, cancelled=true, dead_lettered=true}
"""

_SUBMIT: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'request', ARGV[2], 'status', 'queued', 'attempt', '1')
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('XADD', KEYS[2], '*', 'event', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'event', ARGV[3])
redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
return 1
"""

# KEYS: record, build stream, fleet stream, lease. ARGV: event, status ('' keeps it),
# attempt ('' keeps it), result ('' none), ttl, maxlen, lease ms and holder (with 'running').
# Returns 1 when published, 0 when the build had already ended, -1 when a build about to
# start was cancelled meanwhile.
_PUBLISH: Final = (
    _TERMINAL_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status and terminal[status] then return 0 end
if ARGV[2] == 'running' and redis.call('HGET', KEYS[1], 'cancel') then return -1 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[2]) end
if ARGV[2] == 'running' and ARGV[7] ~= '' then
  redis.call('SET', KEYS[4], ARGV[8], 'PX', ARGV[7])
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'attempt', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[4]) end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[1])
if terminal[ARGV[2]] then
  redis.call('DEL', KEYS[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
elseif not status then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return 1
"""
)

# ARGV: id, cancelled event, result, ttl, maxlen, cancel notice, only-queued flag. A build
# still waiting in the queue ends here; a running one is flagged and its worker told on the
# cancel channel (or, with only-queued, left alone).
_CANCEL: Final = (
    _TERMINAL_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'unknown' end
if terminal[status] then return 'ended' end
local waiting = status == 'queued' or status == 'retrying'
if waiting and redis.call('ZREM', KEYS[4], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[5])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'result', ARGV[3])
  redis.call('XADD', KEYS[2], '*', 'event', ARGV[2])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  return 'cancelled'
end
if ARGV[7] == '1' then return 'left_running' end
redis.call('HSET', KEYS[1], 'cancel', ARGV[6])
redis.call('PUBLISH', KEYS[6], ARGV[6])
return 'signalled'
"""
)


# ARGV: retrying event, next attempt, job envelope for it, maxlen. The job keeps its place in
# arq's queue; the worker then raises arq's Retry, which defers it.
_RESCHEDULE: Final = (
    _TERMINAL_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status and terminal[status] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'retrying', 'attempt', ARGV[2])
redis.call('DEL', KEYS[5])
redis.call('XADD', KEYS[2], '*', 'event', ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[1])
redis.call('SET', KEYS[4], ARGV[3], 'KEEPTTL')
return 1
"""
)

_DEAD_LETTERS_MAXLEN: Final = 10_000


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


class CancelNotice(msgspec.Struct, frozen=True):
    """What workers hear on the cancel channel."""

    build_id: str
    reason: str


cancel_notice_decoder: Final = msgspec.json.Decoder(CancelNotice)


@dataclass(frozen=True, slots=True)
class Submission:
    build_id: str
    created: bool
    """False when a build with this id already existed: submitting is idempotent."""


class BuildStore:
    """Reads and writes build records; shared by producers and workers."""

    def __init__(self, redis: Redis, queue: QueueSettings) -> None:
        self.redis = redis
        self.queue = queue
        self._submit = redis.register_script(_SUBMIT)
        self._publish = redis.register_script(_PUBLISH)
        self._cancel = redis.register_script(_CANCEL)
        self._reschedule = redis.register_script(_RESCHEDULE)
        self._pending: list[tuple[list[str], list[Any], asyncio.Future[PublishOutcome] | None]] = []
        self._flusher: asyncio.Task[None] | None = None

    def _score_ms(self, request: BuildRequest, now_ms: int) -> int:
        if request.priority == "interactive":
            return now_ms - int(self.queue.interactive_head_start_s * 1000)
        return now_ms

    async def _run_scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run many script calls in one pipelined round trip, by sha (producer.lua); the
        first call Redis refused fails them all."""
        replies = await run_scripts(self.redis, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def submit_many(self, requests: Sequence[BuildRequest]) -> list[Submission]:
        """Enqueue every request in one round trip; an id that exists already is left as is."""
        now = time.time()
        now_ms = int(now * 1000)
        calls: list[ScriptCall] = []
        for request in requests:
            stamped = request if request.submitted_at else _with_submitted_at(request, now)
            request_json = encode(stamped)
            queued = Queued(build_id=request.id, at=now, priority=request.priority)
            keys = [
                build_key(request.id),
                events_key(request.id),
                EVENTS_STREAM,
                job_key(request.id),
                self.queue.name,
            ]
            args = [
                request.id,
                request_json,
                encode(queued),
                jobcodec.build_envelope(request_json, now_ms),
                self._score_ms(request, now_ms),
                _PENDING_TTL_S * 1000,
                _PENDING_TTL_S,
                self.queue.events_maxlen,
            ]
            calls.append((self._submit, keys, args))
        created = await self._run_scripts(calls)
        return [
            Submission(request.id, bool(flag))
            for request, flag in zip(requests, created, strict=True)
        ]

    async def publish(
        self,
        event: BuildEvent,
        *,
        status: str = "",
        attempt: int | None = None,
        result: BuildResult | None = None,
        lease: tuple[str, float] | None = None,
    ) -> PublishOutcome:
        """Append an event to the build's stream and the fleet's, moving its status.

        With status "running", `lease` (holder, seconds) takes the build's lease; a terminal
        status drops it.

        Publishes issued while a round trip is under way go together in the next one, in
        order: a worker running many builds pays one round trip per batch, not per event.
        """
        outcome: asyncio.Future[PublishOutcome] = asyncio.get_running_loop().create_future()
        self._enqueue(event, status, attempt, result, outcome, lease)
        return await outcome

    def publish_soon(self, event: BuildEvent) -> None:
        """Queue a progress event without waiting for it; it still lands before anything the
        same process publishes after it. A failure is logged: progress is not worth a stall."""
        self._enqueue(event, "", None, None, None)

    def _enqueue(  # noqa: PLR0917 - private; each caller names what it passes
        self,
        event: BuildEvent,
        status: str,
        attempt: int | None,
        result: BuildResult | None,
        outcome: asyncio.Future[PublishOutcome] | None,
        lease: tuple[str, float] | None = None,
    ) -> None:
        ttl = self.queue.result_ttl_s if is_terminal(event) else _PENDING_TTL_S
        keys = [
            build_key(event.build_id),
            events_key(event.build_id),
            EVENTS_STREAM,
            lease_key(event.build_id),
        ]
        holder, lease_s = lease or ("", 0.0)
        args = [
            encode(event),
            status,
            "" if attempt is None else attempt,
            b"" if result is None else encode(result),
            ttl,
            self.queue.events_maxlen,
            int(lease_s * 1000) if lease else "",
            holder,
        ]
        self._pending.append((keys, args, outcome))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                replies = await self._run_scripts(
                    [(self._publish, keys, args) for keys, args, _ in batch]
                )
            except Exception as exc:  # handed to every publisher waiting on this batch
                logger.warning("publishing %d events failed: %s", len(batch), exc)
                for _, _, outcome in batch:
                    if outcome is not None and not outcome.done():
                        outcome.set_exception(exc)
                continue
            for (_, _, outcome), reply in zip(batch, replies, strict=True):
                if outcome is not None and not outcome.done():
                    outcome.set_result(PublishOutcome(int(reply)))

    async def reschedule(
        self,
        event: Retrying,
        request: BuildRequest,
        next_attempt: int,
        avoid: Sequence[str] = (),
    ) -> PublishOutcome:
        """Publish Retrying and rewrite the queued job so that it runs as `next_attempt`,
        away from the daemons in `avoid` when others are available."""
        now_ms = int(time.time() * 1000)
        envelope = jobcodec.build_envelope(encode(request), now_ms, next_attempt, avoid)
        outcome = await self._reschedule(
            keys=[
                build_key(event.build_id),
                events_key(event.build_id),
                EVENTS_STREAM,
                job_key(event.build_id),
                lease_key(event.build_id),
            ],
            args=[encode(event), next_attempt, envelope, self.queue.events_maxlen],
        )
        return PublishOutcome(int(outcome))

    async def keep_dead_letter(
        self, event: DeadLettered, request: BuildRequest | None, *, raw: bytes = b""
    ) -> None:
        """Keep the full request of a dead-lettered build, for inspection and replay."""
        await self.redis.xadd(
            DEAD_LETTER_STREAM,
            {
                "build_id": event.build_id,
                "reason": event.reason,
                "request": encode(request) if request is not None else raw,
                "at": str(event.at),
            },
            maxlen=_DEAD_LETTERS_MAXLEN,
            approximate=True,
        )

    async def cancel(self, build_id: str, reason: str) -> CancelOutcome:
        [outcome] = await self.cancel_many([(build_id, reason)])
        return outcome

    async def cancel_many(
        self, cancels: Sequence[tuple[str, str]], *, only_queued: bool = False
    ) -> list[CancelOutcome]:
        """Cancel (build id, reason) pairs in one round trip. With `only_queued`, a build
        that has started is left running (CancelOutcome.LEFT_RUNNING)."""
        calls: list[ScriptCall] = []
        for build_id, reason in cancels:
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
            ]
            args = [
                build_id,
                encode(event),
                encode(result),
                self.queue.result_ttl_s,
                self.queue.events_maxlen,
                encode(CancelNotice(build_id=build_id, reason=reason)),
                "1" if only_queued else "",
            ]
            calls.append((self._cancel, keys, args))
        return [
            CancelOutcome(reply.decode() if isinstance(reply, bytes) else reply)
            for reply in await self._run_scripts(calls)
        ]

    async def cancel_requests(self, build_ids: Sequence[str]) -> list[CancelNotice]:
        """The cancels recorded for these builds (what a worker missed on the channel)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for build_id in build_ids:
                pipe.hget(build_key(build_id), "cancel")
            flags: list[bytes | None] = await pipe.execute()
        return [cancel_notice_decoder.decode(flag) for flag in flags if flag]

    async def state(self, build_id: str) -> BuildState | None:
        fields: list[bytes | None] = await self.redis.hmget(  # type: ignore[misc]
            build_key(build_id), ["status", "attempt", "request", "result"]
        )
        status, attempt, request, result = fields
        if status is None:
            return None
        return BuildState(
            build_id=build_id,
            status=cast(Status, status.decode()),
            attempt=int(attempt or 1),
            request=decode_request(request) if request else None,
            result=decode_result(result) if result else None,
        )


def _with_submitted_at(request: BuildRequest, now: float) -> BuildRequest:
    return msgspec.structs.replace(request, submitted_at=now)
