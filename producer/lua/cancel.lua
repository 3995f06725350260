-- Cancel a build (cancel_build in common.lua). With only_queued ('1'), a running build is
-- left alone. Returns cancelled, signalled, left_running, ended or unknown.
local record, build_events, fleet_events, queue, job, channel, active, interactive, batch =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local build_id, event, result, ended_ttl, maxlen, notice, only_queued =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]

return cancel_build(record, build_events, fleet_events, queue, job, channel, active,
                    interactive, batch, build_id, event, result, ended_ttl, maxlen, notice,
                    only_queued == '1')
