--[[
release_reserve: move units from the reserve pool into sale (sellers keep ~20 % back and
release it when demand beats the plan). total is unchanged. Idempotent per operation id:
a re-sent call (same ARGV) replies REPLAYED and moves nothing again.

KEYS[1] stock   KEYS[2] events   KEYS[3] requests (operation ids, "op:<id>")
ARGV[1] sku  ARGV[2] units to release (0 = the whole pool)
ARGV[3] operation id (fresh per call)

Event entry: see inventory/_events.py (EVENT_FIELDS['reserve_released']); none
when no unit moves.

Returns {OK, total, available, held, sold, reserve, released}
     | {REPLAYED, total, available, held, sold, reserve, 0} | {UNKNOWN_SKU, sku}
     | {INSUFFICIENT_STOCK, sku, reserve} | {INVALID, reason}
]]
-- @include codes
-- @include clock
-- @include counts
-- @include stock_fields
-- @include stock_ops

local stock_key, events_key, requests_key = KEYS[1], KEYS[2], KEYS[3]
local sku, units, op_id = ARGV[1], whole(ARGV[2], 0, MAX_UNITS), ARGV[3]
if units == nil then return {INVALID, 'bad_units'} end
if sku == nil or op_id == nil or op_id == '' then return {INVALID, 'bad_request'} end
if stock_op_seen(requests_key, op_id) then
  local row = stock_row(stock_key, sku)
  return {REPLAYED, row[1], row[2], row[3], row[4], row[5], 0}
end
if not stock_exists(stock_key, sku) then return {UNKNOWN_SKU, sku} end
local reserve = stock_get(stock_key, sku, 'reserve')
if units == 0 then units = reserve end
if units > reserve then return {INSUFFICIENT_STOCK, sku, reserve} end

if units > 0 then
  stock_incr(stock_key, sku, 'reserve', -units)
  stock_incr(stock_key, sku, 'available', units)
  redis.call('XADD', events_key, '*', 'type', 'reserve_released', 'sku', sku,
    'units', units, 'at', tostring(now_ms()))
  stock_op_record(requests_key, op_id, 'release_reserve ' .. sku .. ' ' .. units)
end
local row = stock_row(stock_key, sku)
return {OK, row[1], row[2], row[3], row[4], row[5], units}
