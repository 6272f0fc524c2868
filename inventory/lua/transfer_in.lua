--[[
transfer_in: the receiver's side of a bucket transfer (step 3, inventory/_buckets.py):
add the units the donor wrote off, the transfer's id in the entry, and drop the intent —
in one script, so an intent is never left behind by a transfer that completed. Run by the
process making the transfer, or by the settle step once transfer_out said 'moved'; a
second run (same id) adds nothing and only drops the intent.

KEYS[1] stock   KEYS[2] events   KEYS[3] requests (the receiver's "op:xi-<id>")
KEYS[4] transfers (the intents of this bucket)
ARGV[1] sku  ARGV[2] units (1..MAX_UNITS)  ARGV[3] transfer id

Event entry: see inventory/_events.py (EVENT_FIELDS['restocked'])

Returns {OK, total, available, held, sold, reserve}
     | {REPLAYED, total, available, held, sold, reserve} | {UNKNOWN_SKU, sku}
     | {INVALID, reason}
]]
-- @include codes
-- @include clock
-- @include counts
-- @include stock_fields
-- @include transfer_ops

local stock_key, events_key, requests_key, transfers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sku, units, xfer = ARGV[1], whole(ARGV[2], 1, MAX_UNITS), ARGV[3]
if units == nil then return {INVALID, 'bad_units'} end
if sku == nil or sku == '' or not transfer_id_ok(xfer) then return {INVALID, 'bad_request'} end
if transfer_op(requests_key, 'xi', xfer) then
  redis.call('HDEL', transfers_key, xfer)
  local row = stock_row(stock_key, sku)
  return {REPLAYED, row[1], row[2], row[3], row[4], row[5]}
end
-- Unknown SKU: the intent stays, so the audit reports the units as in transit.
if not stock_exists(stock_key, sku) then return {UNKNOWN_SKU, sku} end

stock_incr(stock_key, sku, 'total', units)
stock_incr(stock_key, sku, 'available', units)
redis.call('XADD', events_key, '*', 'type', 'restocked', 'sku', sku, 'delta', units,
  'transfer', xfer, 'at', tostring(now_ms()))
transfer_op_record(requests_key, 'xi', xfer, 'adjust ' .. sku .. ' ' .. units)
redis.call('HDEL', transfers_key, xfer)
local row = stock_row(stock_key, sku)
return {OK, row[1], row[2], row[3], row[4], row[5]}
