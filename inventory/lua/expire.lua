--[[
expire: the sweeper — close holds whose payment deadline has passed, oldest first,
returning their units to sale. Bounded: at most ARGV[1] holds per call; call again
while "more" is 1.

KEYS[1] stock  KEYS[2] holds  KEYS[3] users  KEYS[4] deadlines  KEYS[5] events
ARGV[1] batch limit (1..1000)

Event entry (by hold_close): see inventory/_events.py (EVENT_FIELDS['expired'])

Returns {OK, more (0|1), hold_id...} listing the holds this call expired
     | {INVALID, 'bad_limit'}
]]
-- @include codes
-- @include clock
-- @include counts
-- @include stock_fields
-- @include hold_close

local keys = {stock = KEYS[1], holds = KEYS[2], users = KEYS[3], deadlines = KEYS[4],
  events = KEYS[5]}
local limit = whole(ARGV[1], 1, 1000)
if limit == nil then return {INVALID, 'bad_limit'} end
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', keys.deadlines, '-inf', now, 'LIMIT', 0, limit)
local expired = {OK, 0}
for _, hold_id in ipairs(due) do
  local raw = redis.call('HGET', keys.holds, hold_id)
  if raw then
    local rec = cjson.decode(raw)
    if rec.s == 'held' then
      hold_close(keys, hold_id, rec, 'expired', now)
      expired[#expired + 1] = hold_id
    else
      redis.call('ZREM', keys.deadlines, hold_id)
    end
  else
    redis.call('ZREM', keys.deadlines, hold_id)
  end
end
if #due == limit and redis.call('ZCOUNT', keys.deadlines, '-inf', now) > 0 then
  expired[2] = 1
end
return expired
