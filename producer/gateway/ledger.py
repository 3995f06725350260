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
- Each supersede key's record (one per tenant and key) names its latest build. A build is
  recorded there in the same Lua call that enqueues it and cancels the one it replaced if
  that has not started (or, if so configured, even if it has): no newer push can come in
  between, so the older build is always the one cancelled. A build whose id existed
  already (a resubmission) records and cancels nothing.
- A new delivery takes one Lua call (producer.lua.common's `submit_builds` and
  `cancel_build` inside the ledger's script): claimed, recorded in the push history,
  admitted, enqueued and superseding, or none of it.
- Concurrent calls made in the same event-loop turn share one round trip (producer.batching).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from redis.asyncio import Redis

from producer.batching import Coalescer
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
from producer.lua import ScriptCall, run_scripts, with_common
from producer.store import BuildStore, CancelOutcome

_CANCELLED: Final = (CancelOutcome.CANCELLED.value, CancelOutcome.SIGNALLED.value)

# A delivery's builds in one call: with `fresh` ('1', a new delivery), first admit them
# (producer.gateway.admission) and record the delivery and its commit in the ref's push
# history; then enqueue them (submit_builds), record each one created as the latest of its
# supersede key and cancel the build it replaces (cancel_build): a queued one, a running
# one too where asked. Returns {0, recorded ids} for a repeated delivery, {2, 'b' or 'r'}
# for a commit already built ('b') or moved past ('r'), {3, bound, count, limit} when
# admission refuses (nothing changed in these three cases), else {1, created, old id,
# outcome, created, old id, outcome, ...} per build ('' and '' where nothing was
# replaced). History values are a mark and the push's number; only the newest `keep`
# pushes are kept.
_DELIVER: Final = (
    ADMIT_FUNCTION
    + """
local delivery, history, queue, tenant_set = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local build_ids, delivery_ttl = ARGV[1], ARGV[2]   -- ids as JSON
local record_ttl, build_prefix = ARGV[3], ARGV[4]
local sha, before, history_ttl, keep = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local now, depth_limit, grace = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local set_ttl, tenant_cap, fresh = ARGV[12], tonumber(ARGV[13]), ARGV[14] == '1'
-- ARGV from 15: cancel_build's 9 keys and 6 arguments, made for '{old}' replaced by
-- '{new}'; then submit_builds' arguments. KEYS from 5: submit_builds' keys, then a
-- supersede record per build ('' for none). Then ARGV: per build, '1' when a running build
-- it replaces is cancelled too.
local cancel_at, submit_key, submit_arg = 15, 5, 30
local ids = cjson.decode(build_ids)
local count = #ids
local first_record, first_running = submit_key + 4 + 5 * count, submit_arg + 4 + 7 * count

local function claim()
  local previous = redis.call('GET', delivery)
  if previous then return {0, previous} end
  if sha ~= '' then
    local seen = redis.call('HGET', history, sha)
    if seen then return {2, string.sub(seen, 1, 1)} end
  end
  if count > 0 then
    local bounds = {}
    if tenant_cap then bounds[1] = {'tenant', tenant_set, tenant_cap} end
    local refused = admit(queue, depth_limit, bounds, ids, now, grace, build_prefix, set_ttl)
    if refused then return {3, refused[1], refused[2], refused[3]} end
  end
  redis.call('SET', delivery, build_ids, 'EX', delivery_ttl)
  if sha == '' then return nil end
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
  return nil
end

local function supersede(record, new, running_too)
  local old = redis.call('SET', record, new, 'GET', 'EX', record_ttl)
  if not old or old == new then return '', '' end
  local call = {}
  for i = 1, 15 do
    call[i] = fill(fill(ARGV[cancel_at + i - 1], 'old', old), 'new', new)
  end
  call[16] = not running_too
  return old, cancel_build(unpack(call))
end

if fresh then
  local answer = claim()
  if answer then return answer end
end
local created = submit_builds(KEYS, submit_key, ARGV, submit_arg, count)
local out = {1}
for i = 1, count do
  local record, old, outcome = KEYS[first_record + i - 1], '', ''
  if created[i] == 1 and record ~= '' then
    old, outcome = supersede(record, ids[i], ARGV[first_running + i - 1] == '1')
  end
  out[#out + 1] = created[i]
  out[#out + 1] = old
  out[#out + 1] = outcome
end
return out
"""
)

_json: Final = msgspec.json.Encoder()
_json_list: Final = msgspec.json.Decoder(list[str])


@dataclass(frozen=True, slots=True)
class Superseded:
    """`old_id` was cancelled (or its worker told to stop) because `new_id` replaced it."""

    old_id: str
    new_id: str
    outcome: str


@dataclass(frozen=True, slots=True)
class Enqueued:
    """Builds enqueued (`created` False: one with its id existed already, and it superseded
    nothing), with the older builds they cancelled."""

    created: list[bool]
    superseded: list[Superseded]


@dataclass(frozen=True, slots=True)
class Claimed:
    """A new delivery: its builds are enqueued, and recorded as the latest of their keys."""

    enqueued: Enqueued


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


_NO_PUSH: Final = PushRecord("", "", "")
_NO_CAPS: Final = Caps(0, "", None)


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
        self._deliver = with_common("deliver", _DELIVER)
        self._calls: Coalescer[ScriptCall, list[Any]] = Coalescer(self._run_batch)

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
        """Admit a new delivery's builds under `caps`, record it and its push, enqueue its
        builds and supersede the older builds of their keys, all at once; for a repeat,
        what it made; for a commit already built or moved past, Stale; Refused when
        admission says no (nothing recorded in these three cases). Raises ContractError
        (nothing recorded) for a request the fleet refuses."""
        call = self._call(delivery_key(forge, delivery_id), push, caps, requests, running_too)
        reply = await self._calls(call)
        match int(reply[0]):
            case 1:
                return Claimed(_enqueued(requests, reply[1:]))
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

    async def enqueue(
        self, requests: Sequence[BuildRequest], running_too: Sequence[bool | None]
    ) -> Enqueued:
        """Enqueue builds (no delivery to claim: a resubmission, an API request) and let each
        one created supersede the older build of its key, in one round trip."""
        call = self._call("", _NO_PUSH, _NO_CAPS, requests, running_too, fresh=False)
        return _enqueued(requests, (await self._calls(call))[1:])

    async def _all_exist(self, build_ids: Sequence[str]) -> bool:
        if not build_ids:
            return True
        with unavailable("read builds"):
            count = await self.redis.exists(*(build_key(i) for i in build_ids))
        return int(count) == len(build_ids)

    def _call(
        self,
        delivery: str,
        push: PushRecord,
        caps: Caps,
        requests: Sequence[BuildRequest],
        running_too: Sequence[bool | None],
        *,
        fresh: bool = True,
    ) -> ScriptCall:
        """The deliver script's call (its layout is stated at its top)."""
        submitting = self.store.submitting(requests)
        keys = [
            delivery,
            push.history_key,
            self.queue,
            tenant_queued_key(caps.tenant) if fresh else "",
            *submitting.keys,
            *(self._record(r) for r in requests),
        ]
        cancel_keys, cancel_args = self.store.cancelling("{old}", "superseded by {new}")
        default = self.supersede.cancel_running
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
            "1" if fresh else "",
            *cancel_keys,
            *cancel_args,
            *submitting.args,
            *("1" if (default if c is None else c) else "" for c in running_too),
        ]
        return (self._deliver, keys, args)

    def _record(self, request: BuildRequest) -> str:
        """The record of the latest build of the request's supersede key ('' for none)."""
        if not (self.supersede.enabled and request.supersede_key):
            return ""
        return supersede_record_key(request.tenant, request.supersede_key)

    async def _run_batch(self, calls: list[ScriptCall]) -> list[Any]:
        with unavailable("record the builds"):
            return await run_scripts(self.redis, calls)


def _enqueued(requests: Sequence[BuildRequest], reply: Sequence[Any]) -> Enqueued:
    """The reply's `created, old id, outcome` per request."""
    created, superseded = [], []
    for index, request in enumerate(requests):
        flag, old, outcome = reply[3 * index : 3 * index + 3]
        created.append(bool(flag))
        if _text(outcome) in _CANCELLED:
            superseded.append(Superseded(_text(old), request.id, _text(outcome)))
    return Enqueued(created, superseded)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _decode_ids(value: bytes | str) -> list[str]:
    try:
        return _json_list.decode(value)
    except msgspec.DecodeError:
        return []
