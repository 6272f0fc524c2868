--[[
release: the buyer cancelled — a held hold's units go back on sale.

Idempotent: releasing a hold that is already cancelled or expired answers OK with that
state and changes nothing; a paid hold cannot be released (HOLD_PAID). A hold past its
deadline is closed as "expired", which is what happened to it.

KEYS[1] stock  KEYS[2] holds  KEYS[3] users  KEYS[4] deadlines  KEYS[5] events
ARGV[1] hold id
ARGV[2] user the hold must belong to ('' = any: operator action)

Event entry (by hold_close): see inventory/_events.py (EVENT_FIELDS['released'],
EVENT_FIELDS['expired'])

Returns {OK, state, deadline_ms, changed} or {HOLD_NOT_FOUND} | {HOLD_PAID}
]]
-- @include codes
-- @include clock
-- @include stock_fields
-- @include hold_close

local keys = {stock = KEYS[1], holds = KEYS[2], users = KEYS[3], deadlines = KEYS[4],
  events = KEYS[5]}
local hold_id, user = ARGV[1], ARGV[2]
local raw = redis.call('HGET', keys.holds, hold_id)
if not raw then return {HOLD_NOT_FOUND} end
local rec = cjson.decode(raw)
if user ~= '' and rec.u ~= user then return {HOLD_NOT_FOUND} end
if rec.s == 'paid' then return {HOLD_PAID} end
if rec.s ~= 'held' then return {OK, rec.s, rec.d, 0} end
local now = now_ms()
local to_state = 'cancelled'
if tonumber(rec.d) <= now then to_state = 'expired' end
hold_close(keys, hold_id, rec, to_state, now)
return {OK, to_state, rec.d, 1}
