-- New builds (submit_builds in common.lua); the queue's workers are told once.
-- KEYS: fleet events, queue, index of live builds, queued channel, then five per build.
-- ARGV: job TTL (ms), record TTL (s), events maxlen, recent builds kept, then seven per
-- build. Returns per build 1 when it was created, 0 when its id existed already.
local shared = {KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4]}
local created = submit_builds(shared, KEYS, 5, ARGV, 5, (#ARGV - 4) / 7)
redis.call('PUBLISH', KEYS[4], '')
return created
