-- A new build: its record, its Queued event, its arq job and its place in the queue, in
-- the index of builds that have not ended, in the set of builds waiting at its priority
-- and in its tenant's capped index of recent builds.
-- An id that exists already is left as it is. With `wake` set (the last call of a batch),
-- the queue's workers are told on its channel that builds were queued.
local record, build_events, fleet_events, job, queue, active, waiting, recent, queued_channel =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local build_id, request, queued, envelope, score, job_ttl_ms, record_ttl, maxlen,
  submitted_ms, recent_kept, wake =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10],
  ARGV[11]

local created = 0
if redis.call('EXISTS', record) == 0 then
  redis.call('HSET', record, 'request', request, 'status', 'queued', 'attempt', '1')
  redis.call('EXPIRE', record, record_ttl)
  append(build_events, fleet_events, maxlen, queued)
  redis.call('EXPIRE', build_events, record_ttl)
  redis.call('SET', job, envelope, 'PX', job_ttl_ms)
  redis.call('ZADD', queue, score, build_id)
  redis.call('ZADD', active, score, build_id)
  redis.call('ZADD', waiting, score, build_id)
  redis.call('ZADD', recent, submitted_ms, build_id)
  redis.call('ZREMRANGEBYRANK', recent, 0, -1 - tonumber(recent_kept))
  redis.call('EXPIRE', recent, record_ttl)
  created = 1
end
if wake == '1' then redis.call('PUBLISH', queued_channel, '') end
return created
