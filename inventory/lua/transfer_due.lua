--[[
transfer_due: the intents of a bucket at least ARGV[1] ms old by this server's clock —
the clock that stamped them (transfer_begin) — for the settle step to finish. An intent
without a stamp (recorded by a version before transfer_begin) counts as due: settling a
live transfer early is safe (transfer_out 'abort' refuses its late write-off), leaving a
stranded one is not.

KEYS[1] transfers
ARGV[1] age in ms (0..MAX_TTL_MS)

Returns {OK, now_ms, id, intent, id, intent, ...} | {INVALID, reason}
]]
-- @include codes
-- @include clock
-- @include counts

local age = whole(ARGV[1], 0, MAX_TTL_MS)
if age == nil then return {INVALID, 'bad_age'} end
local now = now_ms()
local out = {OK, now}
local pending = redis.call('HGETALL', KEYS[1])
for i = 1, #pending, 2 do
  local ok, intent = pcall(cjson.decode, pending[i + 1])
  local at = ok and type(intent) == 'table' and tonumber(intent['at_ms']) or nil
  if at == nil or at <= now - age then
    out[#out + 1] = pending[i]
    out[#out + 1] = pending[i + 1]
  end
end
return out
