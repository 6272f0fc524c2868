--[[
room_settle: the order a ticket was spent on has reserved its units (or was refused): the
ticket stops counting against its SKUs' stock. Between room_use and this the units were
still available: releasing the ticket earlier would let the room admit a second buyer for
the same unit. Idempotent; a ticket never settled is released when it would have expired.

KEYS[1] room  KEYS[2] pre-queue (list)  KEYS[3] queue (zset)  KEYS[4] buyers (hash)
KEYS[5] tickets (zset)  KEYS[6] stock (the sale's engine hash)
ARGV[1] buyer  ARGV[2] request id the ticket was spent on

Returns {'ok'} | {'not_spent'} (no ticket of this buyer was spent on that request id)
]]
-- @include room

local buyer, request_id = ARGV[1], ARGV[2]
local rec = get_buyer(buyer)
if rec == nil or rec.st ~= 'used' or rec.r ~= request_id then return {'not_spent'} end
if rec.o ~= nil then
  release_outstanding(rec)
  put_buyer(buyer, rec)
end
redis.call('ZREM', tickets_key, buyer)
return {'ok'}
