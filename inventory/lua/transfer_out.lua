--[[
transfer_out: the donor's side of a bucket transfer (inventory/_buckets.py).

Mode 'move' (step 2, by the process making the transfer): write the units off, the
transfer's id in the entry, so that PostgreSQL can tell units on their way to another
bucket from units gone. Refused (and nothing moves) if the settle step already aborted
this transfer: its intent is gone, so units leaving now would reach no one.

Mode 'abort' (by the settle step, for an intent old enough to be a crashed process's):
decide the transfer for good. If the units already left, say 'moved' (the settle step
then adds them to the receiver); else record it aborted, so that a write-off arriving
late (a process paused, not dead) is refused instead of stranding its units.

KEYS[1] stock   KEYS[2] events   KEYS[3] requests (the donor's "op:xo-<id>")
ARGV[1] sku  ARGV[2] units (1..MAX_UNITS)  ARGV[3] transfer id
ARGV[4] mode: 'move' | 'abort'

Event entry: see inventory/_events.py (EVENT_FIELDS['written_off'])

Returns {OK, 'moved'} | {OK, 'aborted'} | {REPLAYED, 'moved'} | {REPLAYED, 'aborted'}
     | {UNKNOWN_SKU, sku} | {INSUFFICIENT_STOCK, sku, available} | {INVALID, reason}
]]
-- @include codes
-- @include clock
-- @include counts
-- @include stock_fields
-- @include transfer_ops

local stock_key, events_key, requests_key = KEYS[1], KEYS[2], KEYS[3]
local sku, units, xfer, mode = ARGV[1], whole(ARGV[2], 1, MAX_UNITS), ARGV[3], ARGV[4]
if units == nil then return {INVALID, 'bad_units'} end
if sku == nil or sku == '' or not transfer_id_ok(xfer) or (mode ~= 'move' and mode ~= 'abort') then
  return {INVALID, 'bad_request'}
end
local done = transfer_op(requests_key, 'xo', xfer)
if done == TRANSFER_ABORTED then return {REPLAYED, 'aborted'} end
if done then return {REPLAYED, 'moved'} end
if mode == 'abort' then
  transfer_op_record(requests_key, 'xo', xfer, TRANSFER_ABORTED)
  return {OK, 'aborted'}
end
if not stock_exists(stock_key, sku) then return {UNKNOWN_SKU, sku} end
local available = stock_get(stock_key, sku, 'available')
if available < units then return {INSUFFICIENT_STOCK, sku, available} end

stock_incr(stock_key, sku, 'total', -units)
stock_incr(stock_key, sku, 'available', -units)
redis.call('XADD', events_key, '*', 'type', 'written_off', 'sku', sku, 'delta', -units,
  'transfer', xfer, 'at', tostring(now_ms()))
transfer_op_record(requests_key, 'xo', xfer, 'adjust ' .. sku .. ' ' .. -units)
return {OK, 'moved'}
