-- Shared: idempotency of stock changes (stock, adjust, release_reserve). redis-py re-sends
-- a command that timed out, so a script may run twice with the same ARGV; each call
-- carries a fresh operation id, recorded in the requests hash as "op:<id>" (request ids
-- cannot contain ':', so the two never collide) in the same script as the change. A second
-- run finds the record and changes nothing.
local function stock_op_seen(requests_key, op_id)
  return redis.call('HEXISTS', requests_key, 'op:' .. op_id) == 1
end

local function stock_op_record(requests_key, op_id, what)
  redis.call('HSET', requests_key, 'op:' .. op_id, what)
end
