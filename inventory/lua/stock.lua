--[[
stock: put a new SKU on sale.

available = total - reserve; the reserve pool is held back from sale until released.
Validates everything before the first write; a SKU that exists is refused (SKU_EXISTS):
use adjust to change stock. Idempotent per operation id: a re-sent call (same ARGV)
replies REPLAYED and changes nothing.

KEYS[1] stock   KEYS[2] events   KEYS[3] requests (operation ids, "op:<id>")
ARGV[1] sku  ARGV[2] total  ARGV[3] reserve  ARGV[4] per-user limit (0 = none)
ARGV[5] low-stock warning line (units available at or below it show "low")
ARGV[6] operation id (fresh per call)

Event entry: see inventory/_events.py (EVENT_FIELDS['stocked'])

Returns {OK, total, available, held, sold, reserve}
     | {REPLAYED, total, available, held, sold, reserve} | {SKU_EXISTS} | {INVALID, reason}
]]
-- @include codes
-- @include clock
-- @include counts
-- @include stock_fields
-- @include stock_ops

local stock_key, events_key, requests_key = KEYS[1], KEYS[2], KEYS[3]
local sku, op_id = ARGV[1], ARGV[6]
local total, reserve = whole(ARGV[2], 0, MAX_UNITS), whole(ARGV[3], 0, MAX_UNITS)
local limit, low = whole(ARGV[4], 0, MAX_UNITS), whole(ARGV[5], 0, MAX_UNITS)
if total == nil or reserve == nil or limit == nil or low == nil then
  return {INVALID, 'bad_number'}
end
if reserve > total then return {INVALID, 'reserve_exceeds_total'} end
if sku == nil or sku == '' or op_id == nil or op_id == '' then return {INVALID, 'bad_request'} end
if stock_op_seen(requests_key, op_id) then
  local row = stock_row(stock_key, sku)
  return {REPLAYED, row[1], row[2], row[3], row[4], row[5]}
end
if stock_exists(stock_key, sku) then return {SKU_EXISTS} end

redis.call('HSET', stock_key, sku .. ':total', total, sku .. ':available', total - reserve,
  sku .. ':held', 0, sku .. ':sold', 0, sku .. ':reserve', reserve, sku .. ':limit', limit,
  sku .. ':low', low)
redis.call('XADD', events_key, '*', 'type', 'stocked', 'sku', sku, 'total', total,
  'reserve', reserve, 'limit', limit, 'low', low, 'at', tostring(now_ms()))
stock_op_record(requests_key, op_id, 'stock ' .. sku)
local row = stock_row(stock_key, sku)
return {OK, row[1], row[2], row[3], row[4], row[5]}
