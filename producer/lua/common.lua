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

-- A dead letter: the fields of its stream entry (build id, reason, request, ...), as a flat
-- list of names and values.
local function keep_dead_letter(stream, maxlen, fields)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
end
