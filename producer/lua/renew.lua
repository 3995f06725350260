-- A worker's heartbeat: record the worker as alive (KEYS[1], a hash of worker -> beat),
-- then for each attempt it runs renew the lease and the capacity slot and say what the
-- worker must know. Three keys per attempt after the first (record, lease, slot set or
-- ''), four arguments per attempt after the first five (generation, lease value, slot
-- holder or '', slot limit).
-- Per attempt: 1 renewed; 0 lost (a newer attempt took over, or the build is no longer
-- running): stop it; 2 the slot lapsed and the daemon filled up meanwhile: stop it; or
-- the cancel notice recorded for the build: cancel it.
-- A lease that lapsed while Redis was away is re-created by its rightful holder (the
-- record's generation is still its own); a lapsed slot is taken back while there is room.
local workers = KEYS[1]
local lease_ms, now_ms, expiry_ms, worker, beat = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

redis.call('HSET', workers, worker, beat)
local out = {}
for i = 1, (#KEYS - 1) / 3 do
  local record, lease, slots = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local generation, value, holder, limit =
    ARGV[4 * i + 2], ARGV[4 * i + 3], ARGV[4 * i + 4], ARGV[4 * i + 5]
  local fields = redis.call('HMGET', record, 'gen', 'status', 'cancel')
  if fields[1] ~= generation or fields[2] ~= 'running' then
    out[i] = 0
  else
    redis.call('SET', lease, value, 'PX', lease_ms)
    out[i] = 1
    if holder ~= '' and not redis.call('ZSCORE', slots, holder) then
      redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
      if redis.call('ZCARD', slots) >= tonumber(limit) then out[i] = 2 end
    end
    if holder ~= '' and out[i] == 1 then redis.call('ZADD', slots, expiry_ms, holder) end
    if out[i] == 1 and fields[3] then out[i] = fields[3] end
  end
end
return out
