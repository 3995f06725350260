-- A build that has not ended but has neither an arq job, a place in the queue nor a lease
-- has lost its job (arq dropped it after a failure the worker could not record): put it
-- back in the queue as the attempt it was on, with a Retrying event that says so, or end
-- it dead-lettered once it has been put back `max_requeues` times.
-- Returns 1 re-queued, 2 dead-lettered, 0 nothing to do (it is alive, or has ended).
local record, build_events, fleet_events, job, queue, lease, active, dead_letters, waiting =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local build_id, envelope, score, retrying, job_ttl_ms, maxlen, max_requeues =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local dead_lettered, result, ended_ttl, dead_letters_maxlen = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local dead_letter = {unpack(ARGV, 12)}  -- the dead letter's fields

local status = redis.call('HGET', record, 'status')
if not status then
  redis.call('ZREM', active, build_id)
  return 0
end
if terminal[status] then
  redis.call('ZREM', active, build_id)
  return 0
end
if redis.call('EXISTS', job) == 1 or redis.call('ZSCORE', queue, build_id)
    or redis.call('EXISTS', lease) == 1 then
  return 0
end
if redis.call('HINCRBY', record, 'requeues', 1) > tonumber(max_requeues) then
  redis.call('HSET', record, 'status', 'dead_lettered', 'result', result)
  append(build_events, fleet_events, maxlen, dead_lettered)
  redis.call('ZREM', active, build_id)
  keep_dead_letter(dead_letters, dead_letters_maxlen, dead_letter)
  redis.call('EXPIRE', record, ended_ttl)
  redis.call('EXPIRE', build_events, ended_ttl)
  return 2
end
redis.call('HSET', record, 'status', 'retrying')
append(build_events, fleet_events, maxlen, retrying)
redis.call('SET', job, envelope, 'PX', job_ttl_ms)
redis.call('ZADD', queue, score, build_id)
redis.call('ZADD', waiting, score, build_id)
return 1
