-- Shared: reading one SKU's counters from the stock hash (fields "<sku>:<counter>").
local function stock_get(stock_key, sku, field)
  return tonumber(redis.call('HGET', stock_key, sku .. ':' .. field) or '0')
end

local function stock_exists(stock_key, sku)
  return redis.call('HEXISTS', stock_key, sku .. ':total') == 1
end

local function stock_incr(stock_key, sku, field, delta)
  if delta ~= 0 then
    redis.call('HINCRBY', stock_key, sku .. ':' .. field, delta)
  end
end

-- A snapshot row for an event or a reply: total, available, held, sold, reserve.
local function stock_row(stock_key, sku)
  local v = redis.call('HMGET', stock_key, sku .. ':total', sku .. ':available',
    sku .. ':held', sku .. ':sold', sku .. ':reserve')
  return {tonumber(v[1] or '0'), tonumber(v[2] or '0'), tonumber(v[3] or '0'),
    tonumber(v[4] or '0'), tonumber(v[5] or '0')}
end
