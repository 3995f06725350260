-- New builds (submit_builds in common.lua), the queue's workers told once.
-- KEYS: fleet events, queue, index of live builds, queued channel, then five per build.
-- ARGV: job TTL (ms), record TTL (s), events maxlen, recent builds kept, then seven per
-- build. Returns per build 1 when it was created, 0 when its id existed already.
return submit_builds(KEYS, 1, ARGV, 1, (#ARGV - 4) / 7)
