-- arq's claim on the jobs one poll found, all in one call (arq makes four round trips a
-- job): a job is claimed when it is still in the queue, due (scored at most `now_ms`) and
-- held by no worker, until `room` jobs are claimed. The claim is arq's own in-progress
-- key, so arq's workers and these claims exclude each other.
-- KEYS: queue, then each job's in-progress key. ARGV: now_ms, claim_ttl_ms, room, then
-- the job ids in the order the poll found them.
-- Returns {id, score, id, score, ...} of the jobs claimed.
local queue = KEYS[1]
local now_ms, claim_ttl_ms, room = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])

local claimed = {}
for i = 4, #ARGV do
  if #claimed >= 2 * room then break end
  local job_id, claim = ARGV[i], KEYS[i - 2]
  local score = redis.call('ZSCORE', queue, job_id)
  if score and tonumber(score) <= now_ms
    and redis.call('SET', claim, '1', 'NX', 'PX', claim_ttl_ms) then
    claimed[#claimed + 1] = job_id
    claimed[#claimed + 1] = score
  end
end
return claimed
