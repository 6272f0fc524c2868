--[[
room_poll: a waiting buyer asks where they stand. Each poll also runs one bounded
admission step for the whole room (lapsed tickets back, the rate budget refilled, buyers
admitted from the head in queue order while their SKUs have room), so the room moves
whoever asks and needs no process of its own.

KEYS[1] room  KEYS[2] pre-queue (list)  KEYS[3] queue (zset)  KEYS[4] buyers (hash)
KEYS[5] tickets (zset)  KEYS[6] stock (the sale's engine hash)
ARGV[1] buyer  ARGV[2] capacities "sku=n,..." ('' = read KEYS[6])

Returns {state, ahead, waiting, pre-queue length, ticket nonce, ticket expiry ms, now ms,
         T0 ms, admissions/s, ms between the sell-out and this buyer hearing it (-1)}
     | {'not_in_room'} | {'room_off'}
state: pre | waiting | admitted | used | expired | sold_out
]]
-- @include clock
-- @include room

local buyer = ARGV[1]
local c = room_config()
if c.on ~= '1' then return {'room_off'} end
local now = now_ms()
local capacity = make_capacity(parse_given(ARGV[2]))
shuffle_if_due(c, now)
if now >= num(c.t0, 0) then admit_step(c, now, capacity) end
return status(buyer, c, now, capacity)
