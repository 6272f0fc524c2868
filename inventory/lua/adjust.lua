--[[
adjust: change a SKU's stock on sale — restock (delta > 0) or write off units
(delta < 0, e.g. damaged). total and available move together in this one script, so
conservation (available + held + sold + reserve == total) holds at every instant.
Units already held or sold are never taken back: a negative delta larger than what is
available is refused (INSUFFICIENT_STOCK) and changes nothing. Idempotent per operation
id: a re-sent call (same ARGV) replies REPLAYED and does not apply the delta again.

KEYS[1] stock   KEYS[2] events   KEYS[3] requests (operation ids, "op:<id>")
ARGV[1] sku  ARGV[2] delta (non-zero integer, |delta| <= MAX_UNITS)
ARGV[3] operation id (fresh per call)

Event entry: see inventory/_events.py (EVENT_FIELDS['restocked'], EVENT_FIELDS['written_off'])

Returns {OK, total, available, held, sold, reserve}
     | {REPLAYED, total, available, held, sold, reserve} | {UNKNOWN_SKU, sku}
     | {INSUFFICIENT_STOCK, sku, available} | {INVALID, reason}
]]
-- @include codes
-- @include clock
-- @include counts
-- @include stock_fields
-- @include stock_ops

local stock_key, events_key, requests_key = KEYS[1], KEYS[2], KEYS[3]
local sku, delta, op_id = ARGV[1], whole(ARGV[2], -MAX_UNITS, MAX_UNITS), ARGV[3]
if delta == nil or delta == 0 then return {INVALID, 'bad_delta'} end
if sku == nil or op_id == nil or op_id == '' then return {INVALID, 'bad_request'} end
if stock_op_seen(requests_key, op_id) then
  local row = stock_row(stock_key, sku)
  return {REPLAYED, row[1], row[2], row[3], row[4], row[5]}
end
if not stock_exists(stock_key, sku) then return {UNKNOWN_SKU, sku} end
local available = stock_get(stock_key, sku, 'available')
if available + delta < 0 then return {INSUFFICIENT_STOCK, sku, available} end

stock_incr(stock_key, sku, 'total', delta)
stock_incr(stock_key, sku, 'available', delta)
local event_type = 'restocked'
if delta < 0 then event_type = 'written_off' end
redis.call('XADD', events_key, '*', 'type', event_type, 'sku', sku, 'delta', delta,
  'at', tostring(now_ms()))
stock_op_record(requests_key, op_id, 'adjust ' .. sku .. ' ' .. delta)
local row = stock_row(stock_key, sku)
return {OK, row[1], row[2], row[3], row[4], row[5]}
