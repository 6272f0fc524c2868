--[[
transfer_begin: step 1 of a bucket transfer (inventory/_buckets.py): record the intent in
the receiving bucket before any unit moves. The intent carries this server's clock, and
only this server's clock judges its age (transfer_due): neither the process that makes
the transfer nor the one that settles it reads its own clock, so neither can take a live
transfer for a stranded one because the two clocks disagree.

KEYS[1] transfers (of the receiving bucket)
ARGV[1] transfer id  ARGV[2] the donor bucket's sale id  ARGV[3] sku
ARGV[4] units (1..MAX_UNITS)

Returns {OK, at_ms} | {REPLAYED, at_ms} (a re-sent call: already recorded)
     | {INVALID, reason}
]]
-- @include codes
-- @include clock
-- @include counts
-- @include transfer_ops

local transfers_key = KEYS[1]
local xfer, donor, sku, units = ARGV[1], ARGV[2], ARGV[3], whole(ARGV[4], 1, MAX_UNITS)
if units == nil then return {INVALID, 'bad_units'} end
if not transfer_id_ok(xfer) or donor == nil or donor == '' or sku == nil or sku == '' then
  return {INVALID, 'bad_request'}
end
local recorded = redis.call('HGET', transfers_key, xfer)
if recorded then return {REPLAYED, tonumber(cjson.decode(recorded)['at_ms'] or '0')} end
local at = now_ms()
redis.call('HSET', transfers_key, xfer, cjson.encode({from = donor, sku = sku, units = units,
  at_ms = tostring(at)}))
return {OK, at}
