"""Admission: whether new builds may join the queue now, decided in one round trip.

Three bounds, checked together and atomically with counting the builds in:
- the queue's depth (ZCARD, as KEDA reads it): batch submissions stop at one threshold,
  interactive ones and webhook pushes at a higher one;
- a tenant's builds waiting at once;
- an API token's builds waiting at once.

A tenant's (token's) builds are counted in a sorted set of build ids. It is pruned only when
a build would go over the cap: members whose build no longer waits (it started or ended)
go, and so do ids never enqueued (no record after a grace period: their request failed or
was a repeated delivery). So a set never holds much more than its cap, and the common case
costs two ZCARDs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from redis.asyncio import Redis

from producer.batching import Coalescer
from producer.errors import unavailable
from producer.keys import BUILD_PREFIX, tenant_queued_key, token_queued_key
from producer.lua import Script, ScriptCall, run_scripts

GRACE_MS: Final = 60_000
"""An id admitted this recently counts even before its build record exists."""
SET_TTL_S: Final = 30 * 24 * 3600

# admit(queue, depth_limit, bounds, ids, now, grace, prefix, ttl): nil when `ids` may join
# the queue (and they are counted in), else {bound, count, limit}. `bounds` lists
# {name, set, cap} for each cap that applies. Shared by this module's script and the
# webhook ledger's claim (producer.gateway.ledger), which admits a push's builds in the same
# round trip as it claims the delivery.
ADMIT_FUNCTION: Final = """
local function waiting(set, now, grace, prefix)
  -- How many of the set's builds still wait, dropping the others.
  local members = redis.call('ZRANGE', set, 0, -1, 'WITHSCORES')
  for i = 1, #members, 2 do
    local status = redis.call('HGET', prefix .. members[i], 'status')
    local keep
    if status then
      keep = status == 'queued' or status == 'retrying'
    else
      keep = tonumber(members[i + 1]) > now - grace
    end
    if not keep then redis.call('ZREM', set, members[i]) end
  end
  return redis.call('ZCARD', set)
end

local function admit(queue, depth_limit, bounds, ids, now, grace, prefix, ttl)
  local depth = redis.call('ZCARD', queue)
  if depth >= depth_limit then return {'queue', depth, depth_limit} end
  for _, bound in ipairs(bounds) do
    local name, set, cap = bound[1], bound[2], bound[3]
    if redis.call('ZCARD', set) + #ids > cap then
      local held = waiting(set, now, grace, prefix)
      if held + #ids > cap then return {name, held, cap} end
    end
  end
  for _, bound in ipairs(bounds) do
    for _, id in ipairs(ids) do redis.call('ZADD', bound[2], now, id) end
    redis.call('EXPIRE', bound[2], ttl)
  end
  return nil
end
"""

_ADMIT: Final = (
    ADMIT_FUNCTION
    + """
local queue, tenant_set, token_set = KEYS[1], KEYS[2], KEYS[3]
local now, depth_limit, grace = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local prefix, ttl = ARGV[4], ARGV[5]
local tenant_cap, token_cap = tonumber(ARGV[6]), tonumber(ARGV[7])
local ids = {}
for i = 8, #ARGV do ids[#ids + 1] = ARGV[i] end
local bounds = {}
if tenant_cap then bounds[#bounds + 1] = {'tenant', tenant_set, tenant_cap} end
if token_set and token_cap then bounds[#bounds + 1] = {'token', token_set, token_cap} end
return admit(queue, depth_limit, bounds, ids, now, grace, prefix, ttl) or {'ok'}
"""
)


@dataclass(frozen=True, slots=True)
class Admitted:
    pass


@dataclass(frozen=True, slots=True)
class Refused:
    """`bound` ("queue", "tenant" or "token") holds `count` of `limit`."""

    bound: Literal["queue", "tenant", "token"]
    count: int
    limit: int

    @property
    def reason(self) -> str:
        match self.bound:
            case "queue":
                return f"queue depth {self.count} is at its limit {self.limit}; retry later"
            case "tenant":
                return f"the tenant has {self.count} builds queued, its limit is {self.limit}"
            case "token":
                return f"this token has {self.count} builds queued, its limit is {self.limit}"


Admission = Admitted | Refused


@dataclass(frozen=True, slots=True)
class Caps:
    """Whose builds these are and how many may wait."""

    depth: int
    tenant: str
    tenant_cap: int | None
    token: str | None = None
    token_cap: int | None = None


class Admissions:
    def __init__(self, redis: Redis, queue: str) -> None:
        self.redis = redis
        self.queue = queue
        self._admit = Script("admit", _ADMIT)
        self._calls: Coalescer[ScriptCall, Any] = Coalescer(self._run)

    async def admit(self, build_ids: Sequence[str], caps: Caps) -> Admission:
        """Count `build_ids` in under `caps`, or say which bound refuses them (nothing is
        counted then)."""
        keys = [self.queue, tenant_queued_key(caps.tenant)]
        if caps.token is not None:
            keys.append(token_queued_key(caps.token))
        args: list[Any] = [
            int(time.time() * 1000),
            caps.depth,
            GRACE_MS,
            BUILD_PREFIX,
            SET_TTL_S,
            "" if caps.tenant_cap is None else caps.tenant_cap,
            "" if caps.token_cap is None else caps.token_cap,
            *build_ids,
        ]
        return admission_of(await self._calls((self._admit, keys, args)))

    async def _run(self, calls: list[ScriptCall]) -> list[Any]:
        with unavailable("admit builds"):
            return await run_scripts(self.redis, calls)


def admission_of(reply: Sequence[Any]) -> Admission:
    """The admission `admit` (ADMIT_FUNCTION) answered: {'ok'} or {bound, count, limit}."""
    name = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
    match name:
        case "ok":
            return Admitted()
        case "queue" | "tenant" | "token":
            return Refused(name, int(reply[1]), int(reply[2]))
    raise ValueError(f"unexpected admission reply {reply!r}")
