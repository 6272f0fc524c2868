--[[
release_reserve: move units from the reserve pool into sale (sellers keep ~20 % back and
release it when demand beats the plan). total is unchanged.

KEYS[1] stock   KEYS[2] events
ARGV[1] sku  ARGV[2] units to release (0 = the whole pool)

Returns {OK, total, available, held, sold, reserve, released} | {UNKNOWN_SKU, sku}
     | {INSUFFICIENT_STOCK, sku, reserve} | {INVALID, reason}
]]
-- @include codes
-- @include clock
-- @include stock_fields

local stock_key, events_key = KEYS[1], KEYS[2]
local sku, units = ARGV[1], tonumber(ARGV[2])
if units == nil or units < 0 or units ~= math.floor(units) then
  return {INVALID, 'bad_units'}
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
end
local row = stock_row(stock_key, sku)
return {OK, row[1], row[2], row[3], row[4], row[5], units}
