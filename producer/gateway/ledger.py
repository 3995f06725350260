"""The gateway's ledger in Redis: which deliveries it has acted on, and the latest build of
each supersede key. No HTTP here: each operation returns a typed outcome and the handlers
decide what to answer.

Invariants:
- A delivery id is claimed once (`buildfleet:delivery:{forge}:{id}` holds the build ids it
  made). A repeat is `Duplicate`, or `Resubmit` when its first arrival recorded ids it never
  enqueued (a gateway of an earlier version claimed, then lost Redis before enqueuing), so
  a redelivery finishes the job.
- A ref's push history remembers the commits its pushes built, and the ones they moved the
  ref away from. A new delivery of a push to one of them is `Stale` and builds nothing: a
  replayed push (a fresh delivery id on captured bytes) or one that arrives after a newer
  one would move the ref's images back to an older commit.
- Each supersede key's record (one per tenant and key) names its latest build. A build is
  recorded there in the same Lua call that enqueues it and cancels the one it replaced if
  that has not started (or, if so configured, even if it has): no newer push can come in
  between, so the older build is always the one cancelled. A build whose id existed
  already (a resubmission) records and cancels nothing.
- A new delivery is claimed, recorded in its ref's push history, admitted, enqueued and
  superseding in one atomic Lua call (the ledger's script, with `submit_builds` and
  `cancel_build` of producer/lua/common.lua). The deliveries of one
  event-loop turn go in one call of that script, one round trip (producer.batching), up to
  DELIVERIES_PER_CALL of them;
  what they share (settings, fleet-wide keys, the Cancelled event made for any id) is
  sent once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final, cast

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
    delivery_key,
    supersede_record_key,
    tenant_queued_key,
)
from producer.lua import Arg, Frame, run_all, with_common
from producer.store import BuildStore, CancelOutcome

_CANCELLED: Final = (CancelOutcome.CANCELLED.value, CancelOutcome.SIGNALLED.value)

DELIVERIES_PER_CALL: Final = 16
"""At most this many deliveries in one call of the script. Without a bound, the requests
that arrive together travel together: the gateway parses all of them while Redis waits,
then Redis runs one long call while the gateway waits, and the two seldom overlap. In
bench/bench_gateway.py, alternated: 0.148-0.149x of a hello-world with 16, 0.135-0.139x
with 8 (a call's own cost shows), 0.128-0.129x with 32 (docs/benchmarks.md)."""

# The deliveries of a batch in one call, each in turn: with `fresh` ('1', a new delivery),
# first admit its builds (producer.gateway.admission) and record the delivery and its commit
# in the ref's push history; then enqueue them (submit_builds), record each one created as
# the latest of its supersede key and cancel the build it replaces (cancel_build): a queued
# one, a running one too where asked. The queue's workers are told once.
# Per delivery: {0, recorded ids, 1 when those builds all exist} for a repeated delivery,
# {2, 'b' or 'r'} for a commit already built ('b') or moved past ('r'), {3, bound, count,
# limit} when admission refuses (nothing changed in these three cases), else {1, created,
# old id, outcome, created, ...} per build ('' and '' where nothing was replaced). History
# values are a mark and the push's number; only the newest `keep` pushes are kept.
_DELIVER: Final = (
    ADMIT_FUNCTION
    + """
-- KEYS: fleet events, queue, index of live builds, queued channel, then per delivery:
-- delivery, push history, tenant's set, five per build (submit_builds), then a supersede
-- record per build ('' for none).
-- ARGV: submit_builds' four settings, delivery TTL, record TTL, build-key prefix, history
-- TTL, pushes kept, now (ms), grace, set TTL, then cancel_build's 9 keys and 6 arguments
-- made for '{old}' replaced by '{new}'; then per delivery: build count, fresh, ids as JSON,
-- sha, before, depth limit, tenant cap ('' none), seven per build (submit_builds), then per
-- build '1' when a running build it replaces is cancelled too.
local fleet_events, queue, active, queued_channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local shared = {fleet_events, queue, active, ARGV[1], ARGV[2], ARGV[3], ARGV[4]}
local delivery_ttl, record_ttl, build_prefix = ARGV[5], ARGV[6], ARGV[7]
local history_ttl, keep, now = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local grace, set_ttl = tonumber(ARGV[11]), ARGV[12]
local cancel_at = 13

-- 1 when every build a delivery recorded (ids as JSON) exists, else 0.
local function all_exist(recorded)
  local ok, ids = pcall(cjson.decode, recorded)
  if not ok or type(ids) ~= 'table' then return 0 end
  for _, id in ipairs(ids) do
    if redis.call('EXISTS', build_prefix .. id) == 0 then return 0 end
  end
  return 1
end

local function claim(delivery, history, tenant_set, ids, build_ids, sha, before, depth_limit,
                     tenant_cap)
  local previous = redis.call('GET', delivery)
  if previous then return {0, previous, all_exist(previous)} end
  if sha ~= '' then
    local seen = redis.call('HGET', history, sha)
    if seen then return {2, string.sub(seen, 1, 1)} end
  end
  if #ids > 0 then
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
  local call, names = {}, {old = old, new = new}
  for i = 1, 15 do call[i] = fill(ARGV[cancel_at + i - 1], names) end
  call[16] = not running_too
  return old, cancel_build(unpack(call))
end

-- One delivery whose keys start at k and arguments at a: its reply, and where the next
-- delivery's keys and arguments start.
local function deliver(k, a)
  local count, fresh, build_ids = tonumber(ARGV[a]), ARGV[a + 1] == '1', ARGV[a + 2]
  local first_record, first_running = k + 3 + 5 * count, a + 7 + 7 * count
  local ids = cjson.decode(build_ids)
  if fresh then
    local answer = claim(KEYS[k], KEYS[k + 1], KEYS[k + 2], ids, build_ids, ARGV[a + 3],
                         ARGV[a + 4], tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]))
    if answer then return answer, first_record + count, first_running + count end
  end
  local created = submit_builds(shared, KEYS, k + 3, ARGV, a + 7, count)
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
  return out, first_record + count, first_running + count
end

local replies, k, a, queued = {}, 5, cancel_at + 15, false
while a <= #ARGV do
  local reply
  reply, k, a = deliver(k, a)
  replies[#replies + 1] = reply
  queued = queued or (reply[1] == 1 and #reply > 1)
end
if queued then redis.call('PUBLISH', queued_channel, '') end
return replies
"""
)

_json: Final = msgspec.json.Encoder()
_json_list: Final = msgspec.json.Decoder(list[str])


class Superseded(msgspec.Struct, frozen=True):
    """`old_id` was cancelled (or its worker told to stop) because `new_id` replaced it."""

    old_id: str
    new_id: str
    outcome: str


class Enqueued(msgspec.Struct, frozen=True):
    """Builds enqueued (`created` False: one with its id existed already, and it superseded
    nothing), with the older builds they cancelled."""

    created: list[bool]
    superseded: list[Superseded]


class Claimed(msgspec.Struct, frozen=True):
    """A new delivery: its builds are enqueued, and recorded as the latest of their keys."""

    enqueued: Enqueued


class Duplicate(msgspec.Struct, frozen=True):
    """The delivery was acted on before; these are the builds it made."""

    build_ids: list[str]


class Resubmit(msgspec.Struct, frozen=True):
    """The delivery was recorded but its builds never enqueued: enqueue these (same ids)."""

    requests: list[BuildRequest]


class Stale(msgspec.Struct, frozen=True):
    """The pushed commit was already built for the ref (`built`), or the ref has moved past
    it (`older`): building it would move the ref's images back."""

    built: bool


ClaimOutcome = Claimed | Duplicate | Resubmit | Stale | Refused


class PushRecord(msgspec.Struct, frozen=True):
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
        self._deliver = with_common("deliver", _DELIVER)
        self._frames: Coalescer[Frame, list[Any]] = Coalescer(
            self._run_batch, max_batch=DELIVERIES_PER_CALL
        )

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
        frame = self._frame(
            [delivery_key(forge, delivery_id), push.history_key, tenant_queued_key(caps.tenant)],
            [
                "1",
                _json.encode([r.id for r in requests]),
                push.sha,
                push.before,
                caps.depth,
                "" if caps.tenant_cap is None else caps.tenant_cap,
            ],
            requests,
            running_too,
        )
        reply = await self._frames(frame)
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
        if len(recorded) == len(requests) and not int(reply[2]):
            return Resubmit(
                [msgspec.structs.replace(r, id=i) for r, i in zip(requests, recorded, strict=True)]
            )
        return Duplicate(recorded)

    async def enqueue(
        self, requests: Sequence[BuildRequest], running_too: Sequence[bool | None]
    ) -> Enqueued:
        """Enqueue builds (no delivery to claim: a resubmission, an API request) and let each
        one created supersede the older build of its key, in one round trip."""
        ids = _json.encode([r.id for r in requests])
        frame = self._frame(["", "", ""], ["", ids, "", "", 0, ""], requests, running_too)
        return _enqueued(requests, (await self._frames(frame))[1:])

    def _frame(
        self,
        keys: list[str],
        args: list[Arg],
        requests: Sequence[BuildRequest],
        running_too: Sequence[bool | None],
    ) -> Frame:
        """A delivery's frame: its own keys and arguments (delivery, push history, tenant's
        set; fresh, ids, sha, before, depth, tenant cap), then its builds'."""
        builds = self.store.submitting(requests)
        default = self.supersede.cancel_running
        return Frame(
            [*keys, *builds.keys, *(self._record(r) for r in requests)],
            [
                len(requests),
                *args,
                *builds.args,
                *("1" if (default if c is None else c) else "" for c in running_too),
            ],
        )

    def _record(self, request: BuildRequest) -> str:
        """The record of the latest build of the request's supersede key ('' for none)."""
        if not (self.supersede.enabled and request.supersede_key):
            return ""
        return supersede_record_key(request.tenant, request.supersede_key)

    async def _run_batch(self, frames: list[Frame]) -> list[list[Any]]:
        """The frames of a batch in one call of the deliver script (its layout is stated at
        its top): what they share goes once."""
        shared = self.store.submit_shared()
        cancel_keys, cancel_args = self.store.cancelling("{old}", "superseded by {new}")
        keys = list(shared.keys)
        args: list[Arg] = [
            *shared.args,
            self.delivery_ttl_s,
            self.supersede.record_ttl_s,
            BUILD_PREFIX,
            self.history_ttl_s,
            self.history_kept,
            int(time.time() * 1000),
            GRACE_MS,
            SET_TTL_S,
            *cancel_keys,
            *cancel_args,
        ]
        for frame in frames:
            keys += frame.keys
            args += frame.args
        with unavailable("record the builds"):
            [replies] = await run_all(self.redis, [(self._deliver, keys, args)])
        return cast(list[list[Any]], replies)


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
