-- arq's poll, its claims and its reads of the jobs in one call (arq reads the queue in
-- one round trip, claims each job in four and reads it in one more): up to `room` jobs of
-- the queue, in its order, that are due (scored at most `now_ms`) and held by no worker,
-- looking at most `scan` jobs deep (a job stays in the queue while it runs). The claim is
-- arq's own in-progress key, so arq's workers and these claims exclude each other. A
-- queued id whose job is gone (it expired) is taken out of the queue, claim and all, and
-- returned with an empty job, for the worker to say so.
-- KEYS: queue. ARGV: now_ms, claim_ttl_ms, room, scan, the in-progress and job key prefixes.
-- Returns {id, job, id, job, ...} of the jobs claimed.
local queue = KEYS[1]
local now_ms, claim_ttl_ms, room, scan, claim_prefix, job_prefix =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]

local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now_ms, 'LIMIT', 0, scan)
local claimed = {}
for _, id in ipairs(due) do
  if #claimed >= 2 * room then break end
  if redis.call('SET', claim_prefix .. id, '1', 'NX', 'PX', claim_ttl_ms) then
    local job = redis.call('GET', job_prefix .. id)
    if not job then
      job = ''
      redis.call('ZREM', queue, id)
      redis.call('DEL', claim_prefix .. id)
    end
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = job
  end
end
return claimed
