-- Hand a build back to the queue when arq's claim on its job is still there but the
-- build's lease is gone: its worker died (or was cut off) and another may run it.
local claim, lease = KEYS[1], KEYS[2]

if redis.call('EXISTS', lease) == 0 and redis.call('EXISTS', claim) == 1 then
  redis.call('DEL', claim)
  return 1
end
return 0
