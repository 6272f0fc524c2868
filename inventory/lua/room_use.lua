--[[
room_use: an admitted buyer's order spends their ticket. A ticket admits one order attempt
series: the first order binds it to its request id, and retries with that request id pass
again; any other request id is refused.

KEYS[1] room  KEYS[2] pre-queue (list)  KEYS[3] queue (zset)  KEYS[4] buyers (hash)
KEYS[5] tickets (zset)  KEYS[6] stock (the sale's engine hash)
ARGV[1] buyer  ARGV[2] ticket nonce  ARGV[3] request id

Returns {'ok'} | {'ticket_used'} | {'ticket_expired'} | {'ticket_invalid'}
]]
-- @include clock
-- @include room

local buyer, nonce, request_id = ARGV[1], ARGV[2], ARGV[3]
local rec = get_buyer(buyer)
if rec == nil or rec.n == nil or rec.n ~= nonce then return {'ticket_invalid'} end
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
rec.st, rec.r = 'used', request_id
put_buyer(buyer, rec)
release_outstanding(rec)
redis.call('ZREM', tickets_key, buyer)
redis.call('HINCRBY', room_key, 'used', 1)
return {'ok'}
