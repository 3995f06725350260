"""The gateway's ledger in Redis: which deliveries it has acted on, and the latest build of
each supersede key. No HTTP here: each operation returns a typed outcome and the handlers
decide what to answer.

Invariants:
- A delivery id is claimed once (`buildfleet:delivery:{forge}:{id}` holds the build ids it
  made). A repeat is `Duplicate`, or `Resubmit` when its first arrival recorded ids it never
  enqueued (Redis went away in between), so a redelivery finishes the job.
- A ref's push history remembers the commits its pushes built, and the ones they moved the
  ref away from. A new delivery of a push to one of them is `Stale` and builds nothing: a
  replayed push (a fresh delivery id on captured bytes) or one that arrives after a newer
  one would move the ref's images back to an older commit.
- Each supersede key's record (one per tenant and key) names its latest build. Recording
  a new build returns the one it replaced, which is cancelled if it has not started (or, if
  so configured, even if it has). A build recorded before it was enqueued may be overtaken
  meanwhile by a newer push that could not cancel it yet: it cancels itself
  (`overtaken_check`). Whatever the interleaving, one of the two cancels the older build.
- Concurrent calls made in the same event-loop turn share one round trip (producer.batching).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from redis.asyncio import Redis

from producer.batching import Coalescer, regroup
from producer.contract import BuildRequest
from producer.errors import unavailable
from producer.gateway.admission import (
    ADMIT_FUNCTION,
    GRACE_MS,
    SET_TTL_S,
    Caps,
    Refused,
    admission_of,
)
from producer.gateway.settings import SupersedeSettings
from producer.keys import (
    BUILD_PREFIX,
    build_key,
    delivery_key,
    supersede_record_key,
    tenant_queued_key,
)
from producer.lua import Script, ScriptCall, run_scripts
from producer.store import BuildStore, CancelOutcome

_QUEUED_STATUSES: Final = frozenset({"queued", "retrying"})
_CANCELLED: Final = (CancelOutcome.CANCELLED, CancelOutcome.SIGNALLED)

# Records each new build id as the latest of its supersede key, returning per key the id it
# replaced and that build's status ('' and '' when there was none).
_SWAP_FUNCTION: Final = """
local function swap(first_key, ttl, prefix, first_id)
  local out = {}
  for i = first_key, #KEYS do
    local new = ARGV[first_id + i - first_key]
    local old = redis.call('SET', KEYS[i], new, 'GET', 'EX', ttl)
    if old and old ~= new then
      out[#out + 1] = old
      out[#out + 1] = redis.call('HGET', prefix .. old, 'status') or ''
    else
      out[#out + 1] = ''
      out[#out + 1] = ''
    end
  end
  return out
end
"""

# A new delivery, in one round trip: admit its builds (producer.gateway.admission), record
# the delivery and its commit in the ref's push history, and, for each supersede key, record
# its new build as the latest and return the build it replaces with that build's status.
# Returns {0, recorded ids} for a repeated delivery, {2, 'b' or 'r'} for a commit already
# built ('b') or moved past ('r'), {3, bound, count, limit} when admission refuses (nothing
# changed in these three cases), else {1, old, status, old, status, ...} ('' and '' where
# nothing was replaced). History values are a mark and the push's number; only the newest
# `keep` pushes are kept.
_CLAIM: Final = (
    _SWAP_FUNCTION
    + ADMIT_FUNCTION
    + """
local delivery, history, queue, tenant_set = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local build_ids, delivery_ttl = ARGV[1], ARGV[2]   -- ids as JSON
local record_ttl, build_prefix = ARGV[3], ARGV[4]
local sha, before, history_ttl, keep = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local now, depth_limit, grace = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local set_ttl, tenant_cap = ARGV[12], tonumber(ARGV[13])
local first_record, first_id = 5, 14       -- KEYS: records; ARGV: a new build id per record
local previous = redis.call('GET', delivery)
if previous then return {0, previous} end
if sha ~= '' then
  local seen = redis.call('HGET', history, sha)
  if seen then return {2, string.sub(seen, 1, 1)} end
end
local ids = cjson.decode(build_ids)
if #ids > 0 then
  local bounds = {}
  if tenant_cap then bounds[1] = {'tenant', tenant_set, tenant_cap} end
  local refused = admit(queue, depth_limit, bounds, ids, now, grace, build_prefix, set_ttl)
  if refused then return {3, refused[1], refused[2], refused[3]} end
end
redis.call('SET', delivery, build_ids, 'EX', delivery_ttl)
if sha ~= '' then
  local n = redis.call('HINCRBY', history, '#', 1)
  redis.call('HSET', history, sha, 'b' .. n)
  if before ~= '' and before ~= sha then redis.call('HSETNX', history, before, 'r' .. n) end
  redis.call('EXPIRE', history, history_ttl)
  if redis.call('HLEN', history) > 2 * keep + 1 then
    local all = redis.call('HGETALL', history)
    for i = 1, #all, 2 do
      if all[i] ~= '#' and tonumber(string.sub(all[i + 1], 2)) <= n - keep then
        redis.call('HDEL', history, all[i])
      end
    end
  end
end
local out = swap(first_record, record_ttl, build_prefix, first_id)
table.insert(out, 1, 1)
return out
"""
)

# KEYS: supersede records; ARGV: ttl, build-key prefix, then one new build id per record.
_SWAP: Final = _SWAP_FUNCTION + "\nreturn swap(1, ARGV[1], ARGV[2], 3)\n"

_json: Final = msgspec.json.Encoder()
_json_list: Final = msgspec.json.Decoder(list[str])


@dataclass(frozen=True, slots=True)
class Replaced:
    """A supersede record moved from `old_id` (then in `status`, '' if unknown) to `new_id`."""

    old_id: str
    status: str
    new_id: str
    cancel_running: bool


@dataclass(frozen=True, slots=True)
class Superseded:
    """`old_id` was cancelled (or its worker told to stop) because `new_id` replaced it."""

    old_id: str
    new_id: str
    outcome: str


@dataclass(frozen=True, slots=True)
class Claimed:
    """A new delivery: its builds are recorded as the latest of their keys."""

    replaced: list[Replaced]


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The delivery was acted on before; these are the builds it made."""

    build_ids: list[str]


@dataclass(frozen=True, slots=True)
class Resubmit:
    """The delivery was recorded but its builds never enqueued: enqueue these (same ids)."""

    requests: list[BuildRequest]


@dataclass(frozen=True, slots=True)
class Stale:
    """The pushed commit was already built for the ref (`built`), or the ref has moved past
    it (`older`): building it would move the ref's images back."""

    built: bool


ClaimOutcome = Claimed | Duplicate | Resubmit | Stale | Refused


@dataclass(frozen=True, slots=True)
class PushRecord:
    """Where a delivery's push goes in the ref's history ('' sha: it builds nothing)."""

    history_key: str
    sha: str
    before: str


class Ledger:
    def __init__(
        self,
        redis: Redis,
        store: BuildStore,
        supersede: SupersedeSettings,
        *,
        queue: str,
        delivery_ttl_s: int,
        history_ttl_s: int,
        history_kept: int = 256,
    ) -> None:
        self.redis = redis
        self.store = store
        self.queue = queue
        self.supersede = supersede
        self.delivery_ttl_s = delivery_ttl_s
        self.history_ttl_s = history_ttl_s
        self.history_kept = history_kept
        self._claim = Script("claim", _CLAIM)
        self._swap = Script("swap", _SWAP)
        self._claims: Coalescer[ScriptCall, Any] = Coalescer(self._run_batch)
        self._latest: Coalescer[list[str], list[Any]] = Coalescer(self._latest_batch)
        self._cancels: Coalescer[tuple[str, str], CancelOutcome] = Coalescer(self._cancel_batch)

    # --- deliveries ----------------------------------------------------------------------

    async def claim(
        self,
        forge: str,
        delivery_id: str,
        push: PushRecord,
        requests: Sequence[BuildRequest],
        *,
        running_too: Sequence[bool | None],
        caps: Caps,
    ) -> ClaimOutcome:
        """Admit a new delivery's builds under `caps`, record it and its push, and swap its
        supersede records; for a repeat, what it made; for a commit already built or moved
        past, Stale; Refused (nothing recorded) when admission says no."""
        keyed = self._supersedable(requests, running_too)
        keys = [
            delivery_key(forge, delivery_id),
            push.history_key,
            self.queue,
            tenant_queued_key(caps.tenant),
            *(_record(r) for r, _ in keyed),
        ]
        args = [
            _json.encode([r.id for r in requests]),
            self.delivery_ttl_s,
            self.supersede.record_ttl_s,
            BUILD_PREFIX,
            push.sha,
            push.before,
            self.history_ttl_s,
            self.history_kept,
            int(time.time() * 1000),
            caps.depth,
            GRACE_MS,
            SET_TTL_S,
            "" if caps.tenant_cap is None else caps.tenant_cap,
            *(r.id for r, _ in keyed),
        ]
        reply = await self._claims((self._claim, keys, args))
        match int(reply[0]):
            case 1:
                return Claimed(_replaced(keyed, reply[1:]))
            case 2:
                return Stale(built=_text(reply[1]) == "b")
            case 3:
                refusal = admission_of(reply[1:])
                assert isinstance(refusal, Refused), reply
                return refusal
        recorded = _decode_ids(reply[1])  # 0: a repeated delivery
        if len(recorded) == len(requests) and not await self._all_exist(recorded):
            return Resubmit(
                [msgspec.structs.replace(r, id=i) for r, i in zip(requests, recorded, strict=True)]
            )
        return Duplicate(recorded)

    async def release(self, forge: str, delivery_id: str, push: PushRecord) -> None:
        """Forget a claimed delivery whose builds could not be enqueued, so that its
        redelivery makes them (best effort: Redis is usually what failed)."""
        with unavailable("release the delivery"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(delivery_key(forge, delivery_id))
                if push.sha:
                    pipe.hdel(push.history_key, push.sha)
                await pipe.execute()

    async def _all_exist(self, build_ids: Sequence[str]) -> bool:
        if not build_ids:
            return True
        with unavailable("read builds"):
            count = await self.redis.exists(*(build_key(i) for i in build_ids))
        return int(count) == len(build_ids)

    # --- supersede -----------------------------------------------------------------------

    async def swap_latest(
        self, requests: Sequence[BuildRequest], running_too: Sequence[bool | None]
    ) -> list[Replaced]:
        """Record each (enqueued) build as the latest of its supersede key."""
        keyed = self._supersedable(requests, running_too)
        if not keyed:
            return []
        keys = [_record(r) for r, _ in keyed]
        args = [self.supersede.record_ttl_s, BUILD_PREFIX, *(r.id for r, _ in keyed)]
        reply = await self._claims((self._swap, keys, args))
        return _replaced(keyed, reply)

    async def cancel_replaced(
        self,
        replaced: Sequence[Replaced],
        overtaken_check: Sequence[BuildRequest] = (),
    ) -> tuple[list[Superseded], int]:
        """Cancel the builds the new ones replace: queued ones, running ones if so asked.
        With `overtaken_check`, also cancel those of these (just enqueued) builds that a
        newer push has replaced meanwhile; both go out in the same round trip. Returns the
        builds superseded, and how many builds were cancelled in all."""
        cancels = [
            r
            for r in replaced
            if r.status in _QUEUED_STATUSES or (r.cancel_running and r.status == "running")
        ]
        keyed = [r for r in overtaken_check if r.supersede_key]
        latest = (
            self._latest.enqueue([_record(r) for r in keyed])
            if keyed and self.supersede.enabled
            else None
        )
        outcomes = await asyncio.gather(
            *(self._cancels.enqueue((r.old_id, f"superseded by {r.new_id}")) for r in cancels)
        )
        done = [
            Superseded(r.old_id, r.new_id, outcome.value)
            for r, outcome in zip(cancels, outcomes, strict=True)
            if outcome in _CANCELLED
        ]
        overtaken = 0 if latest is None else await self._cancel_overtaken(keyed, await latest)
        return done, len(done) + overtaken

    async def _cancel_overtaken(self, keyed: Sequence[BuildRequest], latest: Sequence[Any]) -> int:
        """Builds recorded as latest before they were enqueued may have been replaced by a
        newer push meanwhile, which could not cancel them (they were not there yet): they
        cancel themselves. Returns how many were cancelled."""
        count = 0
        for request, now in zip(keyed, latest, strict=True):
            newer = _text(now)
            if newer and newer != request.id:
                outcome = await self._cancels((request.id, f"superseded by {newer}"))
                count += outcome in _CANCELLED
        return count

    def _supersedable(
        self, requests: Sequence[BuildRequest], running_too: Sequence[bool | None]
    ) -> list[tuple[BuildRequest, bool]]:
        """The requests that replace an older build, with whether a running one goes too."""
        if not self.supersede.enabled:
            return []
        default = self.supersede.cancel_running
        return [
            (r, default if c is None else c)
            for r, c in zip(requests, running_too, strict=True)
            if r.supersede_key
        ]

    # --- batches (one round trip each) -----------------------------------------------------

    async def _run_batch(self, calls: list[ScriptCall]) -> list[Any]:
        with unavailable("record the builds"):
            return await run_scripts(self.redis, calls)

    async def _latest_batch(self, key_lists: list[list[str]]) -> list[list[Any]]:
        with unavailable("read supersede records"):
            values = await self.redis.mget([key for keys in key_lists for key in keys])
        return regroup(values, key_lists)

    async def _cancel_batch(self, items: list[tuple[str, str]]) -> list[CancelOutcome]:
        with unavailable("cancel"):
            return await self.store.cancel_many(items)


def _record(request: BuildRequest) -> str:
    """The record of the latest build for a request's supersede key (callers filter on it)."""
    return supersede_record_key(request.tenant, request.supersede_key or "")


def _replaced(keyed: Sequence[tuple[BuildRequest, bool]], reply: Sequence[Any]) -> list[Replaced]:
    out = []
    for index, (request, running_too) in enumerate(keyed):
        old, status = _text(reply[2 * index]), _text(reply[2 * index + 1])
        if old:
            out.append(Replaced(old, status, request.id, running_too))
    return out


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _decode_ids(value: bytes | str) -> list[str]:
    try:
        return _json_list.decode(value)
    except msgspec.DecodeError:
        return []
