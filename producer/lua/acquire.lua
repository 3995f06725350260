-- A capacity slot for an attempt that is waiting for one: the first slot set with room
-- (they come in rank order) takes the holder. Returns its position, or 0 when all are full.
local now_ms, expiry_ms, holder = ARGV[1], ARGV[2], ARGV[3]
local limits = {unpack(ARGV, 4)}

return take_slot(KEYS, 1, limits, holder, now_ms, expiry_ms)
