-- Shared by every script below (prepended when a script is loaded).
local terminal = {succeeded=true, failed=true, cancelled=true, dead_lettered=true}

-- The first slot set of `keys` (from index `first`) with room takes `member` until
-- `expiry`; returns its position among them (1-based), or 0 when every one is full.
-- `limits[i]` caps the i-th set. Holders whose expiry has passed are dropped first.
local function take_slot(keys, first, limits, member, now, expiry)
  for i = first, #keys do
    local key = keys[i]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZSCORE', key, member)
        or redis.call('ZCARD', key) < tonumber(limits[i - first + 1]) then
      redis.call('ZADD', key, expiry, member)
      return i - first + 1
    end
  end
  return 0
end

local function append(build_events, fleet_events, maxlen, event)
  redis.call('XADD', build_events, '*', 'event', event)
  redis.call('XADD', fleet_events, 'MAXLEN', '~', maxlen, '*', 'event', event)
end

-- A dead letter: the fields of its stream entry (build id, reason, request, ...), as a flat
-- list of names and values.
local function keep_dead_letter(stream, maxlen, fields)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
end

-- `template` with every `{name}` in it replaced by `values[name]` (key names and encoded
-- events made for a build id known only here; an id never holds a brace). One pass in C;
-- a value goes in as it is (a table replacement knows no `%` escapes).
local function fill(template, values)
  return (string.gsub(template, '{(%a+)}', values))
end

-- New builds: each one's record, its Queued event, its arq job and its place in the queue,
-- in the index of builds that have not ended, in the set of builds waiting at its priority
-- and in its tenant's capped index of recent builds. An id that exists already is left as
-- it is. (The caller tells the queue's workers, once.)
-- shared: fleet events, queue, index of live builds, job TTL (ms), record TTL (s), events
-- maxlen, recent builds kept. keys (from k), per build: record, events, job, waiting set,
-- tenant's recent builds. args (from a), per build: id, request, Queued event, job envelope
-- around the request (head, tail), score, submitted (ms).
-- Returns per build 1 when it was created, else 0.
local function submit_builds(shared, keys, k, args, a, count)
  local fleet_events, queue, active = shared[1], shared[2], shared[3]
  local job_ttl_ms, record_ttl, maxlen, recent_kept =
    shared[4], shared[5], shared[6], tonumber(shared[7])
  local created = {}
  for i = 1, count do
    local ki, ai = k + 5 * (i - 1), a + 7 * (i - 1)
    local record, build_events, job, waiting, recent =
      keys[ki], keys[ki + 1], keys[ki + 2], keys[ki + 3], keys[ki + 4]
    local build_id, request, queued, head, tail, score, submitted_ms =
      args[ai], args[ai + 1], args[ai + 2], args[ai + 3], args[ai + 4], args[ai + 5],
      args[ai + 6]
    created[i] = 0
    if redis.call('EXISTS', record) == 0 then
      redis.call('HSET', record, 'request', request, 'status', 'queued', 'attempt', '1')
      redis.call('EXPIRE', record, record_ttl)
      append(build_events, fleet_events, maxlen, queued)
      redis.call('EXPIRE', build_events, record_ttl)
      redis.call('SET', job, head .. request .. tail, 'PX', job_ttl_ms)
      redis.call('ZADD', queue, score, build_id)
      redis.call('ZADD', active, score, build_id)
      redis.call('ZADD', waiting, score, build_id)
      redis.call('ZADD', recent, submitted_ms, build_id)
      redis.call('ZREMRANGEBYRANK', recent, 0, -1 - recent_kept)
      redis.call('EXPIRE', recent, record_ttl)
      created[i] = 1
    end
  end
  return created
end

-- Cancel a build. One still waiting in the queue ends here with its Cancelled event; a
-- running one is flagged and its worker told on the cancel channel (or, with only_queued,
-- left alone; one a worker has taken but not started yet is flagged all the same, so that
-- it never starts). Returns what happened: cancelled, signalled, left_running, ended, unknown.
local function cancel_build(record, build_events, fleet_events, queue, job, channel, active,
                            interactive, batch, build_id, event, result, ended_ttl, maxlen,
                            notice, only_queued)
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
  if only_queued and status == 'running' then return 'left_running' end
  redis.call('HSET', record, 'cancel', notice)
  redis.call('PUBLISH', channel, notice)
  return 'signalled'
end
