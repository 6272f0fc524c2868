-- Shared: closing a hold. The only code that moves units out of "held"; confirm,
-- release and expire all call it, after checking the hold is still "held", so each hold
-- makes exactly one transition and its units are returned or sold exactly once.
--
-- rec is the decoded hold record: {u=user, l={{sku, qty}, ...}, s=state, d=deadline,
-- c=created, r=request id}. to_state is 'paid', 'cancelled' or 'expired'.
-- Event entry: see inventory/_events.py (EVENT_FIELDS['confirmed'], EVENT_FIELDS['released'],
-- EVENT_FIELDS['expired']).
local function hold_close(keys, hold_id, rec, to_state, now)
  local stock_key, holds_key, users_key, deadlines_key, events_key =
    keys.stock, keys.holds, keys.users, keys.deadlines, keys.events
  local parts = {}
  for _, line in ipairs(rec.l) do
    local sku, qty = line[1], tonumber(line[2])
    stock_incr(stock_key, sku, 'held', -qty)
    if to_state == 'paid' then
      stock_incr(stock_key, sku, 'sold', qty)
    else
      stock_incr(stock_key, sku, 'available', qty)
      -- Units that went back on sale no longer count against the buyer's limit.
      local left = redis.call('HINCRBY', users_key, rec.u .. ':' .. sku, -qty)
      if left <= 0 then redis.call('HDEL', users_key, rec.u .. ':' .. sku) end
    end
    parts[#parts + 1] = sku .. ':' .. qty
  end
  rec.s = to_state
  rec.t = tostring(now)
  redis.call('HSET', holds_key, hold_id, cjson.encode(rec))
  redis.call('ZREM', deadlines_key, hold_id)
  local event_type = ({paid = 'confirmed', cancelled = 'released', expired = 'expired'})[to_state]
  redis.call('XADD', events_key, '*', 'type', event_type, 'order', hold_id, 'user', rec.u,
    'lines', table.concat(parts, ','), 'request', rec.r, 'deadline', rec.d, 'at', tostring(now))
end
