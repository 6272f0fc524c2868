--[[
room_configure: put a sale behind its waiting room (or take it out), and set how the room
admits. The shuffle seed is fixed the first time and never changed once the pre-queue was
shuffled (a run stays auditable).

KEYS[1] room (hash)
ARGV[1] on (1 | 0)  ARGV[2] admissions per second  ARGV[3] oversubscription factor (>= 0)
ARGV[4] ticket lifetime (ms)  ARGV[5] T0, the opening (ms)  ARGV[6] shuffle seed (1..2^31-2)

Returns {'ok', seed}
]]
local room_key = KEYS[1]
local on, rate, factor, ttl_ms, t0, seed = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if (on ~= '1' and on ~= '0') or rate == nil or rate <= 0 or factor == nil or factor < 0
  or ttl_ms == nil or ttl_ms < 1 or t0 == nil or seed == nil or seed < 1 or seed > 2147483646 then
  return {'invalid'}
end
redis.call('HSET', room_key, 'on', on, 'rate', tostring(rate), 'burst', tostring(math.max(1, rate)),
  'factor', tostring(factor), 'ttl_ms', tostring(ttl_ms), 't0', tostring(t0))
redis.call('HSETNX', room_key, 'seed', tostring(seed))
return {'ok', redis.call('HGET', room_key, 'seed')}
