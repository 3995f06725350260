-- Shared by every script below (prepended when a script is loaded).
local terminal = {succeeded=true, failed=true, cancelled=true, dead_lettered=true}

-- The first slot set of `keys` (from index `first`) with room takes `member` until
-- `expiry`; returns its position among them (1-based), or 0 when every one is full.
-- `limits[i]` caps the i-th set. Holders whose expiry has passed are dropped first.
local function take_slot(keys, first, limits, member, now, expiry)
  for i = first, #keys do
    local key = keys[i]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZSCORE', key, member)
        or redis.call('ZCARD', key) < tonumber(limits[i - first + 1]) then
      redis.call('ZADD', key, expiry, member)
      return i - first + 1
    end
  end
  return 0
end

local function append(build_events, fleet_events, maxlen, event)
  redis.call('XADD', build_events, '*', 'event', event)
  redis.call('XADD', fleet_events, 'MAXLEN', '~', maxlen, '*', 'event', event)
end

-- The full request of a dead-lettered build, for inspection and replay.
local function keep_dead_letter(stream, maxlen, build_id, reason, request)
  local now = redis.call('TIME')
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'build_id', build_id,
    'reason', reason, 'request', request, 'at', now[1] .. '.' .. string.format('%06d', now[2]))
end
