--[[
room_join: a buyer joins the sale's waiting room for some SKUs. Before T0 they join the
pre-queue (shuffled once at T0); after T0 they join at the back. Joining again is a poll
(nobody loses their place by refreshing); a buyer whose ticket lapsed joins at the back.

KEYS[1] room  KEYS[2] pre-queue (list)  KEYS[3] queue (zset)  KEYS[4] buyers (hash)
KEYS[5] tickets (zset)  KEYS[6] stock (the sale's engine hash)
ARGV[1] buyer  ARGV[2] SKUs, comma-separated  ARGV[3] capacities "sku=n,..." ('' = read KEYS[6])

Returns the buyer's status (see room_poll), or {'room_off'} | {'invalid'}
]]
-- @include clock
-- @include room

local buyer, skus = ARGV[1], ARGV[2]
if buyer == nil or buyer == '' or skus == nil or skus == '' then return {'invalid'} end
local c = room_config()
if c.on ~= '1' then return {'room_off'} end
local now = now_ms()
local capacity = make_capacity(parse_given(ARGV[3]))
shuffle_if_due(c, now)
local rec = get_buyer(buyer)
if rec == nil or rec.st == 'expired' or (rec.st == 'sold_out' and not all_gone(split_skus(skus), capacity, now)) then
  rec = {s = skus, j = now}
  if now < num(c.t0, 0) then
    rec.st, rec.p = 'pre', 0
    redis.call('RPUSH', pre_key, buyer)
  else
    local pos = redis.call('HINCRBY', room_key, 'next', 1)
    rec.st, rec.p = 'waiting', pos
    redis.call('ZADD', queue_key, pos, buyer)
  end
  put_buyer(buyer, rec)
  redis.call('HINCRBY', room_key, 'joined', 1)
end
if now >= num(c.t0, 0) then admit_step(c, now, capacity) end
return status(buyer, c, now, capacity)
