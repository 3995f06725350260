-- Cancel a build. One still waiting in the queue ends here with its Cancelled event; a
-- running one is flagged and its worker told on the cancel channel (or, with only_queued,
-- left alone). Returns what happened: cancelled, signalled, left_running, ended, unknown.
local record, build_events, fleet_events, queue, job, channel, active, interactive, batch =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local build_id, event, result, ended_ttl, maxlen, notice, only_queued =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]

local status = redis.call('HGET', record, 'status')
if not status then return 'unknown' end
if terminal[status] then return 'ended' end
local waiting = status == 'queued' or status == 'retrying'
if waiting and redis.call('ZREM', queue, build_id) == 1 then
  redis.call('DEL', job)
  redis.call('ZREM', active, build_id)
  redis.call('ZREM', interactive, build_id)
  redis.call('ZREM', batch, build_id)
  redis.call('HSET', record, 'status', 'cancelled', 'result', result)
  append(build_events, fleet_events, maxlen, event)
  redis.call('EXPIRE', record, ended_ttl)
  redis.call('EXPIRE', build_events, ended_ttl)
  return 'cancelled'
end
if only_queued == '1' then return 'left_running' end
redis.call('HSET', record, 'cancel', notice)
redis.call('PUBLISH', channel, notice)
return 'signalled'
