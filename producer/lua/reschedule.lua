-- An attempt failed and another will follow: the build waits (`retrying`) as its next
-- attempt, its arq job is rewritten for that attempt and deferred in the queue to
-- `next_at_ms`, the worker's claim on it dropped (what arq's finish_job does for a
-- Retry), the lease is dropped and the capacity slot freed.
-- Returns 1 rescheduled, 0 already ended, -2 fenced off.
local record, build_events, fleet_events, job, lease, slots, waiting, queue, claim =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local build_id, event, next_attempt, envelope, maxlen, generation, holder, score, next_at_ms =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]

local status = redis.call('HGET', record, 'status')
if status and terminal[status] then return 0 end
if redis.call('HGET', record, 'gen') ~= generation then return -2 end
redis.call('HSET', record, 'status', 'retrying', 'attempt', next_attempt)
redis.call('DEL', lease)
if holder ~= '' then redis.call('ZREM', slots, holder) end
append(build_events, fleet_events, maxlen, event)
redis.call('SET', job, envelope, 'KEEPTTL')
redis.call('ZADD', waiting, score, build_id)
redis.call('ZADD', queue, next_at_ms, build_id)
redis.call('DEL', claim)
return 1
