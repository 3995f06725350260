-- An event of a build: appended to its stream and the fleet's, moving its status when it
-- is a transition. A build that has ended takes nothing more, and an attempt that a newer
-- one fenced off (its generation is no longer the record's) publishes nothing. A terminal
-- event also drops the lease, frees the attempt's capacity slot, takes the build out of
-- the index of live builds, keeps a dead letter when asked, and shortens every TTL to the
-- result's. It finishes the build's arq job too, as arq's finish_job would (the worker
-- then skips that round trip). Returns 1 published, 0 already ended, -2 fenced off.
local record, build_events, fleet_events, lease, active, slots, dead_letters =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local waiting_interactive, waiting_batch = KEYS[8], KEYS[9]
local queue, job, claim = KEYS[10], KEYS[11], KEYS[12]
local build_id, event, status, result, generation, maxlen, ended_ttl, pending_ttl, holder =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local dead_letters_maxlen = ARGV[10]
local dead_letter = {unpack(ARGV, 11)}  -- the entry's fields, when a dead letter is kept

local current = redis.call('HGET', record, 'status')
if current and terminal[current] then return 0 end
if generation ~= '' and redis.call('HGET', record, 'gen') ~= generation then return -2 end
if status ~= '' then redis.call('HSET', record, 'status', status) end
if result ~= '' then redis.call('HSET', record, 'result', result) end
append(build_events, fleet_events, maxlen, event)
if terminal[status] then
  redis.call('DEL', lease)
  redis.call('ZREM', active, build_id)
  redis.call('ZREM', waiting_interactive, build_id)
  redis.call('ZREM', waiting_batch, build_id)
  if holder ~= '' then redis.call('ZREM', slots, holder) end
  if #dead_letter > 0 then keep_dead_letter(dead_letters, dead_letters_maxlen, dead_letter) end
  redis.call('EXPIRE', record, ended_ttl)
  redis.call('EXPIRE', build_events, ended_ttl)
  redis.call('ZREM', queue, build_id)
  redis.call('DEL', job, claim)
elseif not current then
  redis.call('EXPIRE', record, pending_ttl)
  redis.call('EXPIRE', build_events, pending_ttl)
end
return 1
