-- Hand a build back to the queue when arq's claim on its job is still there but the
-- build's lease is gone: its worker died (or was cut off) and another may run it. A claim
-- younger than `min_age_ms` is left alone: its attempt may not have taken its lease yet
-- (arq claims a job a moment before the attempt starts, longer on a loaded worker). A
-- claim's age is what its TTL has lost since arq set it to `claim_ttl_ms`.
-- The reaped attempt is fenced at once (a new lease generation): a holder that was only
-- cut off (paused, or Redis away) must not renew its lapsed lease and build on beside
-- the re-run; its next heartbeat hears that it lost the build.
local claim, lease, record = KEYS[1], KEYS[2], KEYS[3]
local claim_ttl_ms, min_age_ms = tonumber(ARGV[1]), tonumber(ARGV[2])

if redis.call('EXISTS', lease) == 1 then return 0 end
local ttl = redis.call('PTTL', claim)
if ttl < 0 and ttl ~= -1 then return 0 end  -- -2: no claim
if ttl >= 0 and claim_ttl_ms - ttl < min_age_ms then return 0 end
redis.call('DEL', claim)
if redis.call('EXISTS', record) == 1 then redis.call('HINCRBY', record, 'gen', 1) end
return 1
