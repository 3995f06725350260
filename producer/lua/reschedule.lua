-- An attempt failed and another will follow: the build waits (`retrying`) as its next
-- attempt, its arq job is rewritten for that attempt (the worker then raises arq's Retry,
-- which defers the job), the lease is dropped and the capacity slot freed.
-- Returns 1 rescheduled, 0 already ended, -2 fenced off.
local record, build_events, fleet_events, job, lease, slots, waiting =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local build_id, event, next_attempt, envelope, maxlen, generation, holder, score =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]

local status = redis.call('HGET', record, 'status')
if status and terminal[status] then return 0 end
if redis.call('HGET', record, 'gen') ~= generation then return -2 end
redis.call('HSET', record, 'status', 'retrying', 'attempt', next_attempt)
redis.call('DEL', lease)
if holder ~= '' then redis.call('ZREM', slots, holder) end
append(build_events, fleet_events, maxlen, event)
redis.call('SET', job, envelope, 'KEEPTTL')
redis.call('ZADD', waiting, score, build_id)
return 1
