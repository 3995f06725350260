-- The watchdog's look at some builds that have not ended: returns the ids of those that
-- have neither an arq job, a place in the queue nor a lease (their job was lost), and
-- takes builds that have ended or expired out of the index.
-- KEYS: queue, index of live builds, then per build: record, job, lease. ARGV: build ids.
local queue, active = KEYS[1], KEYS[2]

local lost = {}
for i = 1, #ARGV do
  local build_id = ARGV[i]
  local record, job, lease = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local status = redis.call('HGET', record, 'status')
  if not status or terminal[status] then
    redis.call('ZREM', active, build_id)
  elseif redis.call('EXISTS', job) == 0 and not redis.call('ZSCORE', queue, build_id)
      and redis.call('EXISTS', lease) == 0 then
    lost[#lost + 1] = build_id
  end
end
return lost
