--[[
room_use: an admitted buyer's order spends their ticket. A ticket admits one order attempt
series for the SKUs it was admitted for: the first order binds it to its request id, and
retries with that request id pass again; any other request id, or an order for SKUs the
buyer did not queue for, is refused (and changes nothing). The ticket still counts against
its SKUs' stock until room_settle (after the order's reservation: until then the unit is
not yet held) or, if that never comes, until the ticket's expiry.

KEYS[1] room  KEYS[2] pre-queue (list)  KEYS[3] queue (zset)  KEYS[4] buyers (hash)
KEYS[5] tickets (zset)  KEYS[6] stock (the sale's engine hash)
ARGV[1] buyer  ARGV[2] ticket nonce  ARGV[3] request id  ARGV[4] the order's SKUs, comma-separated ('' = not checked)

Returns {'ok'} | {'ticket_used'} | {'ticket_expired'} | {'ticket_invalid'} | {'ticket_other_sku'}
]]
-- @include clock
-- @include room

local buyer, nonce, request_id = ARGV[1], ARGV[2], ARGV[3]
local rec = get_buyer(buyer)
if rec == nil or rec.n == nil or rec.n ~= nonce then return {'ticket_invalid'} end
local queued = {}
for _, sku in ipairs(split_skus(rec.s)) do queued[sku] = true end
for _, sku in ipairs(split_skus(ARGV[4] or '')) do
  if not queued[sku] then return {'ticket_other_sku'} end
end
if rec.r ~= nil then
  if rec.r == request_id then return {'ok'} end
  return {'ticket_used'}
end
local now = now_ms()
if rec.st ~= 'admitted' then return {'ticket_expired'} end
if now > num(rec.x, 0) then
  release_outstanding(rec)
  rec.st = 'expired'
  put_buyer(buyer, rec)
  redis.call('ZREM', tickets_key, buyer)
  return {'ticket_expired'}
end
rec.st, rec.r, rec.u = 'used', request_id, now
put_buyer(buyer, rec)
redis.call('HINCRBY', room_key, 'used', 1)
return {'ok'}
