-- An attempt starts. A new lease generation fences every earlier attempt of the build
-- (their events and transitions are refused from now on), the lease is taken, the build
-- moves to running (noting when, `started_ms`) with its Started event, and when slot sets are given (the daemons the
-- build would rather run on, in rank order) a capacity slot is taken on the first with room.
-- KEYS: record, build events, fleet events, lease, waiting set, then the slot sets.
-- Returns {0} when the build has ended, {-1} when a cancel came first, else
-- {1, generation, position of the slot set taken (0: none)}.
local record, build_events, fleet_events, lease, waiting =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local build_id, event, attempt, worker, lease_ms, maxlen, record_ttl, now_ms, expiry_ms =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local limits = {unpack(ARGV, 10)}

local status = redis.call('HGET', record, 'status')
if status and terminal[status] then return {0} end
if redis.call('HEXISTS', record, 'cancel') == 1 then return {-1} end
local generation = redis.call('HINCRBY', record, 'gen', 1)
redis.call('HSET', record, 'status', 'running', 'attempt', attempt, 'started_ms', now_ms)
redis.call('ZREM', waiting, build_id)
redis.call('SET', lease, worker .. ' ' .. generation, 'PX', lease_ms)
append(build_events, fleet_events, maxlen, event)
if not status then
  redis.call('EXPIRE', record, record_ttl)
  redis.call('EXPIRE', build_events, record_ttl)
end
local slot = 0
if #KEYS > 5 then
  slot = take_slot(KEYS, 6, limits, build_id .. '#' .. generation, now_ms, expiry_ms)
end
return {1, generation, slot}
