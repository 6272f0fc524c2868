-- Shared: the waiting room's state and its admission step (room_join, room_poll, room_use).
--
-- Buyer records live in the room's buyers hash as JSON: {s = "sku1,sku2", j = joined ms,
-- st = pre|waiting|admitted|used|expired|sold_out, p = queue position (0 in the pre-queue),
-- a = admitted ms, n = ticket nonce, x = ticket expiry ms, o = SKUs the admission counted
-- against, r = request id the ticket was used for, t = ms the buyer was told "sold out", d = ms between the sell-out and then}.
-- A SKU "could still be sold" while available + held (holds may lapse) + reserve pool > 0;
-- buyers are admitted against what is available now (times the oversubscription factor).

local room_key, pre_key, queue_key, buyers_key, tickets_key, stock_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]

local SCAN = 200          -- queue entries one admission step looks at (bounded work)
local EXPIRE_BATCH = 200  -- lapsed tickets one step takes back

local function room_config()
  local raw = redis.call('HGETALL', room_key)
  local c = {}
  for i = 1, #raw, 2 do c[raw[i]] = raw[i + 1] end
  return c
end

local function num(value, default)
  local n = tonumber(value)
  if n == nil then return default end
  return n
end

local function get_buyer(buyer)
  local raw = redis.call('HGET', buyers_key, buyer)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function put_buyer(buyer, rec)
  redis.call('HSET', buyers_key, buyer, cjson.encode(rec))
end

local function split_skus(text)
  local out = {}
  for sku in string.gmatch(text, '[^,]+') do out[#out + 1] = sku end
  return out
end

-- Capacities given by the caller ("sku=<could still be sold>/<available>,..."): a bucketed sale's stock lives in its
-- buckets (other hash slots), which one script cannot read.
local function parse_given(text)
  if text == nil or text == '' then return nil end
  local given = {}
  for sku, could, now in string.gmatch(text, '([^,=]+)=(%d+)/(%d+)') do
    given[sku] = {tonumber(could), tonumber(now)}
  end
  return given
end

-- capacity(sku) -> could still be sold (available + held + reserve), available now.
local function make_capacity(given)
  local cache = {}
  return function(sku)
    if cache[sku] == nil then
      if given ~= nil then
        cache[sku] = given[sku] or {0, 0}
      else
        local v = redis.call('HMGET', stock_key, sku .. ':available', sku .. ':held', sku .. ':reserve')
        if not v[1] then cache[sku] = {0, 0} else
          cache[sku] = {num(v[1], 0) + num(v[2], 0) + num(v[3], 0), num(v[1], 0)}
        end
      end
    end
    return cache[sku][1], cache[sku][2]
  end
end

-- Park-Miller minimal standard generator: exact in Lua's doubles (16807 * 2^31 < 2^53),
-- so the shuffle can be replayed outside Redis from the recorded seed.
local function next_random(x) return (x * 16807) % 2147483647 end

-- At T0 the pre-queue gets one uniform shuffle (Fisher-Yates), seeded and recorded.
local function shuffle_if_due(c, now)
  if c.shuffled == '1' or now < num(c.t0, 0) then return end
  local pre = redis.call('LRANGE', pre_key, 0, -1)
  local x = num(c.seed, 1)
  for i = #pre, 2, -1 do
    x = next_random(x)
    local j = (x % i) + 1
    pre[i], pre[j] = pre[j], pre[i]
  end
  local next_pos = num(c.next, 0)
  local batch = {}
  for i, buyer in ipairs(pre) do
    local rec = get_buyer(buyer)
    if rec and rec.st == 'pre' then
      rec.st, rec.p = 'waiting', next_pos + i
      put_buyer(buyer, rec)
      batch[#batch + 1] = next_pos + i
      batch[#batch + 1] = buyer
      if #batch >= 1000 then redis.call('ZADD', queue_key, unpack(batch)); batch = {} end
    end
  end
  if #batch > 0 then redis.call('ZADD', queue_key, unpack(batch)) end
  redis.call('HSET', room_key, 'shuffled', '1', 'next', tostring(next_pos + #pre), 'shuffled_n', tostring(#pre))
  c.shuffled, c.next = '1', tostring(next_pos + #pre)
end

-- The SKUs an admission counted against (those that could still be sold then) in rec.o.
local function release_outstanding(rec)
  for _, sku in ipairs(split_skus(rec.o or '')) do redis.call('HINCRBY', room_key, 'out:' .. sku, -1) end
  rec.o = nil
end

local function expire_tickets(now)
  local lapsed = redis.call('ZRANGEBYSCORE', tickets_key, '-inf', now, 'LIMIT', 0, EXPIRE_BATCH)
  for _, buyer in ipairs(lapsed) do
    local rec = get_buyer(buyer)
    if rec and rec.st == 'admitted' then
      release_outstanding(rec)
      rec.st = 'expired'
      put_buyer(buyer, rec)
      redis.call('HINCRBY', room_key, 'expired', 1)
    end
    redis.call('ZREM', tickets_key, buyer)
  end
end

-- Every SKU the buyer asked for can no longer be sold: note when each was first seen so.
local function all_gone(skus, capacity, now)
  local gone = true
  for _, sku in ipairs(skus) do
    if capacity(sku) > 0 then gone = false
    else redis.call('HSETNX', room_key, 'soldout:' .. sku, now) end
  end
  return gone
end

local function leave_sold_out(buyer, rec)
  rec.st = 'sold_out'
  put_buyer(buyer, rec)
  redis.call('ZREM', queue_key, buyer)
end

-- One admission step: take back lapsed tickets, refill the rate budget, then admit from
-- the head of the queue in order while the budget lasts and each asked-for SKU has room
-- (admitted-but-unused tickets < available now x oversubscription).
local function admit_step(c, now, capacity)
  expire_tickets(now)
  local rate, burst = num(c.rate, 1), math.max(1, num(c.burst, 1))
  local tokens = math.min(burst, num(c.tokens, burst) + (now - num(c.refill_ms, now)) * rate / 1000)
  local factor = num(c.factor, 1)
  local admitted = 0
  if tokens >= 1 then
    local head = redis.call('ZRANGE', queue_key, 0, SCAN - 1)
    for _, buyer in ipairs(head) do
      if tokens < 1 then break end
      local rec = get_buyer(buyer)
      if rec == nil then
        redis.call('ZREM', queue_key, buyer)
      else
        local skus = split_skus(rec.s)
        if all_gone(skus, capacity, now) then
          leave_sold_out(buyer, rec)
        else
          local fits = true
          for _, sku in ipairs(skus) do
            local could, available = capacity(sku)
            local outstanding = num(redis.call('HGET', room_key, 'out:' .. sku), 0)
            if could > 0 and outstanding >= math.floor(available * factor + 1e-9) then fits = false end
          end
          if fits then
            tokens = tokens - 1
            admitted = admitted + 1
            local nonce = redis.call('HINCRBY', room_key, 'admits', 1)
            rec.st, rec.a, rec.n, rec.x = 'admitted', now, tostring(nonce), now + num(c.ttl_ms, 120000)
            redis.call('ZREM', queue_key, buyer)
            redis.call('ZADD', tickets_key, rec.x, buyer)
            local counted = {}
            for _, sku in ipairs(skus) do
              if capacity(sku) > 0 then
                redis.call('HINCRBY', room_key, 'out:' .. sku, 1)
                counted[#counted + 1] = sku
              end
            end
            rec.o = table.concat(counted, ',')
            put_buyer(buyer, rec)
          end
        end
      end
    end
  end
  redis.call('HSET', room_key, 'tokens', tostring(tokens), 'refill_ms', tostring(now))
  return admitted
end

-- The buyer's own answer: their SKUs checked now (a buyer of a sold-out SKU hears it on
-- this poll, wherever they stand), their position, their ticket.
local function status(buyer, c, now, capacity)
  local rec = get_buyer(buyer)
  if rec == nil then return {'not_in_room'} end
  if (rec.st == 'waiting' or rec.st == 'pre') and now >= num(c.t0, 0) and all_gone(split_skus(rec.s), capacity, now) then
    leave_sold_out(buyer, rec)
  end
  if rec.st == 'sold_out' and rec.t == nil then
    rec.t = now
    local newest = 0
    for _, sku in ipairs(split_skus(rec.s)) do
      newest = math.max(newest, num(redis.call('HGET', room_key, 'soldout:' .. sku), now))
    end
    rec.d = math.max(0, now - newest)
    put_buyer(buyer, rec)
    redis.call('HINCRBY', room_key, 'told_sold_out', 1)
    local worst = num(redis.call('HGET', room_key, 'told_max_ms'), 0)
    if rec.d > worst then redis.call('HSET', room_key, 'told_max_ms', tostring(rec.d)) end
  end
  local ahead = 0
  if rec.st == 'waiting' then ahead = num(redis.call('ZRANK', queue_key, buyer), 0) end
  return {rec.st, tostring(ahead), tostring(redis.call('ZCARD', queue_key)),
          tostring(redis.call('LLEN', pre_key)), rec.n or '', tostring(rec.x or 0),
          tostring(now), c.t0 or '0', c.rate or '0', tostring(rec.d or -1)}
end
