-- A new build: its record, its Queued event, its arq job and its place in the queue and in
-- the index of builds that have not ended and the set of builds waiting at its priority.
-- An id that exists already is left as it is.
local record, build_events, fleet_events, job, queue, active, waiting =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local build_id, request, queued, envelope, score, job_ttl_ms, record_ttl, maxlen =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]

if redis.call('EXISTS', record) == 1 then return 0 end
redis.call('HSET', record, 'request', request, 'status', 'queued', 'attempt', '1')
redis.call('EXPIRE', record, record_ttl)
append(build_events, fleet_events, maxlen, queued)
redis.call('EXPIRE', build_events, record_ttl)
redis.call('SET', job, envelope, 'PX', job_ttl_ms)
redis.call('ZADD', queue, score, build_id)
redis.call('ZADD', active, score, build_id)
redis.call('ZADD', waiting, score, build_id)
return 1
