--[[
confirm: the buyer paid — a held hold's units become sold.

One winner: a hold makes exactly one transition out of "held". If it is already paid,
confirm is a no-op that says so (idempotent). If its deadline has passed but the sweeper
has not run yet, the deadline wins: confirm expires it (units back on sale) and
answers HOLD_EXPIRED, so a late payment can never resurrect stock that is for sale again.

KEYS[1] stock  KEYS[2] holds  KEYS[3] users  KEYS[4] deadlines  KEYS[5] events
ARGV[1] hold id
ARGV[2] user the hold must belong to ('' = any: operator action)

Event entry (by hold_close): see inventory/_events.py (EVENT_FIELDS['confirmed'],
EVENT_FIELDS['expired'])

Returns {OK, state, deadline_ms, changed (1 = this call made the transition, 0 = already)}
     or {HOLD_NOT_FOUND} | {HOLD_EXPIRED} | {HOLD_CANCELLED}
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
if rec.s == 'paid' then return {OK, 'paid', rec.d, 0} end
if rec.s == 'cancelled' then return {HOLD_CANCELLED} end
if rec.s == 'expired' then return {HOLD_EXPIRED} end
local now = now_ms()
if tonumber(rec.d) <= now then
  hold_close(keys, hold_id, rec, 'expired', now)
  return {HOLD_EXPIRED}
end
hold_close(keys, hold_id, rec, 'paid', now)
return {OK, 'paid', rec.d, 1}
