--[[
stock: put a new SKU on sale.

available = total - reserve; the reserve pool is held back from sale until released.
Validates everything before the first write; a SKU that exists is refused (SKU_EXISTS):
use adjust to change stock.

KEYS[1] stock   KEYS[2] events
ARGV[1] sku  ARGV[2] total  ARGV[3] reserve  ARGV[4] per-user limit (0 = none)
ARGV[5] low-stock warning line (units available at or below it show "low")

Returns {OK, total, available, held, sold, reserve} | {SKU_EXISTS} | {INVALID, reason}
]]
-- @include codes
-- @include clock
-- @include stock_fields

local stock_key, events_key = KEYS[1], KEYS[2]
local sku = ARGV[1]
local total, reserve, limit, low =
  tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
for _, v in ipairs({total, reserve, limit, low}) do
  if v == nil or v < 0 or v ~= math.floor(v) then return {INVALID, 'bad_number'} end
end
if reserve > total then return {INVALID, 'reserve_exceeds_total'} end
if stock_exists(stock_key, sku) then return {SKU_EXISTS} end

redis.call('HSET', stock_key, sku .. ':total', total, sku .. ':available', total - reserve,
  sku .. ':held', 0, sku .. ':sold', 0, sku .. ':reserve', reserve, sku .. ':limit', limit,
  sku .. ':low', low)
redis.call('XADD', events_key, '*', 'type', 'stocked', 'sku', sku, 'total', total,
  'reserve', reserve, 'limit', limit, 'low', low, 'at', tostring(now_ms()))
local row = stock_row(stock_key, sku)
return {OK, row[1], row[2], row[3], row[4], row[5]}
