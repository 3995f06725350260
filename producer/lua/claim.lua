-- arq's poll and its claims in one call (arq reads the queue in one round trip, then
-- claims each job in four): up to `room` jobs of the queue, in its order, that are due
-- (scored at most `now_ms`) and held by no worker, looking at most `scan` jobs deep (a
-- job stays in the queue while it runs). The claim is arq's own in-progress key, so arq's
-- workers and these claims exclude each other.
-- KEYS: queue. ARGV: now_ms, claim_ttl_ms, room, scan, the in-progress key prefix.
-- Returns {id, score, id, score, ...} of the jobs claimed.
local queue = KEYS[1]
local now_ms, claim_ttl_ms, room, scan, claim_prefix =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]

local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now_ms, 'WITHSCORES', 'LIMIT', 0, scan)
local claimed = {}
for i = 1, #due, 2 do
  if #claimed >= 2 * room then break end
  if redis.call('SET', claim_prefix .. due[i], '1', 'NX', 'PX', claim_ttl_ms) then
    claimed[#claimed + 1] = due[i]
    claimed[#claimed + 1] = due[i + 1]
  end
end
return claimed
