--[[
reserve: hold stock for a batch of reservation requests, each all-or-nothing.

Many concurrent callers' requests are coalesced into one call (inventory/_batching.py);
each request is decided on its own, in order, against the stock the previous ones left.
For each request: validate every line first, then write; nothing is written for a
refused request.

Idempotency lives here, not in the client: the first outcome of a request that made a
hold is stored in the requests hash, so a retry — or a command the client library
re-sent after a timeout — returns that hold and never makes a second one. Request ids
are scoped per buyer: the record is "r:<user>:<request id>" (inventory/_keys.py,
SaleKeys.request_field), so another buyer's use of the same id is no replay, no conflict
and no clue. A buyer reusing their own id with other lines is refused (REQUEST_CONFLICT).
Refusals are not stored: they changed nothing, so a retry is decided afresh.

KEYS[1] stock      hash  "<sku>:total|available|held|sold|reserve|limit|low"
KEYS[2] holds      hash  hold id -> JSON hold record
KEYS[3] requests   hash  "r:<user>:<request id>" -> JSON {h = hold id, f = fingerprint}
KEYS[4] users      hash  "<user>:<sku>" -> units held or bought (per-user limit)
KEYS[5] deadlines  zset  hold id scored by its deadline (ms)
KEYS[6] events     stream, one "reserved" entry per hold made

ARGV[1]   number of requests N
then N groups: request_id, hold_id, user, ttl_ms, n_lines, sku_1, qty_1, ..., sku_n, qty_n

Event entry: see inventory/_events.py (EVENT_FIELDS['reserved'])

Returns one array per request:
  {OK, hold_id, deadline_ms, 'held', created_ms}
  {REPLAYED, hold_id, deadline_ms, state, created_ms}   same request id seen before
  {SOLD_OUT, sku, available}
  {LIMIT_EXCEEDED, sku, limit, already_counted}
  {UNKNOWN_SKU, sku}
  {INVALID, reason}
  {REQUEST_CONFLICT, hold_id}
A malformed batch (count, line counts or ids that do not match ARGV, a request id or user
with ':') writes nothing and returns the single result {{INVALID, 'bad_batch'}}.
Bounded: at most 1000 requests (MAX_BATCH) of at most 20 lines (MAX_LINES) per call.
]]
-- @include codes
-- @include clock
-- @include counts
-- @include stock_fields

local stock_key, holds_key, requests_key, users_key, deadlines_key, events_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now = now_ms()

-- The batch's view of each SKU it touches: read once (one HMGET) and kept in step with
-- every write, so each request of the batch is decided against what the previous ones
-- left without reading the stock hash again. Most of a surge's batch is one hot SKU, so
-- this saves three commands per reservation. The counters themselves are written with
-- each hold (not deferred to the end of the batch): whatever happens later in the
-- script, every hold written so far has its counters.
local sku_rows = {}
local function sku_row(sku)
  local row = sku_rows[sku]
  if row == nil then
    local v = redis.call('HMGET', stock_key, sku .. ':total', sku .. ':available', sku .. ':limit')
    row = {exists = v[1] ~= false, available = tonumber(v[2] or '0'), limit = tonumber(v[3] or '0')}
    sku_rows[sku] = row
  end
  return row
end

local function decide(request_id, hold_id, user, ttl, lines)
  if ttl == nil then return {INVALID, 'bad_ttl'} end
  local fingerprint = user
  for i, line in ipairs(lines) do
    if line[2] == nil then return {INVALID, 'invalid_quantity'} end
    for j = 1, i - 1 do
      if lines[j][1] == line[1] then return {INVALID, 'duplicate_line'} end
    end
    fingerprint = fingerprint .. '|' .. line[1] .. ':' .. line[2]
  end

  local record_field = 'r:' .. user .. ':' .. request_id
  local seen = redis.call('HGET', requests_key, record_field)
  if seen then
    -- A record that does not decode, or names a hold that is gone, is refused rather
    -- than raised: an error here, after earlier requests of the batch wrote their holds,
    -- would tell their callers "error" while the holds exist.
    local ok, first = pcall(cjson.decode, seen)
    if not ok or type(first) ~= 'table' or type(first.h) ~= 'string' then
      return {INVALID, 'bad_request_record'}
    end
    if first.f ~= fingerprint then return {REQUEST_CONFLICT, first.h} end
    local raw = redis.call('HGET', holds_key, first.h)
    if not raw then return {INVALID, 'bad_request_record'} end
    local hold = cjson.decode(raw)
    return {REPLAYED, first.h, hold.d, hold.s, hold.c}
  end
  if redis.call('HEXISTS', holds_key, hold_id) == 1 then
    return {INVALID, 'hold_id_taken'}
  end

  -- Validate every line before the first write.
  for _, line in ipairs(lines) do
    local sku, qty = line[1], line[2]
    local row = sku_row(sku)
    if not row.exists then return {UNKNOWN_SKU, sku} end
    if row.available < qty then return {SOLD_OUT, sku, row.available} end
    if row.limit > 0 then
      local counted = tonumber(redis.call('HGET', users_key, user .. ':' .. sku) or '0')
      if counted + qty > row.limit then return {LIMIT_EXCEEDED, sku, row.limit, counted} end
    end
  end

  -- Write.
  local parts, record_lines = {}, {}
  for _, line in ipairs(lines) do
    local sku, qty = line[1], line[2]
    local row = sku_row(sku)
    row.available = row.available - qty
    stock_incr(stock_key, sku, 'available', -qty)
    stock_incr(stock_key, sku, 'held', qty)
    redis.call('HINCRBY', users_key, user .. ':' .. sku, qty)
    parts[#parts + 1] = sku .. ':' .. qty
    record_lines[#record_lines + 1] = {sku, qty}
  end
  local deadline = now + ttl
  redis.call('HSET', holds_key, hold_id, cjson.encode({
    u = user, l = record_lines, s = 'held', d = tostring(deadline), c = tostring(now),
    r = request_id}))
  redis.call('HSET', requests_key, record_field, cjson.encode({h = hold_id, f = fingerprint}))
  redis.call('ZADD', deadlines_key, deadline, hold_id)
  redis.call('XADD', events_key, '*', 'type', 'reserved', 'order', hold_id, 'user', user,
    'lines', table.concat(parts, ','), 'request', request_id, 'deadline', tostring(deadline),
    'at', tostring(now))
  return {OK, hold_id, tostring(deadline), 'held', tostring(now)}
end

-- Parse the whole batch before deciding any request: a runtime error after one request
-- wrote its hold would leave that hold in place while every caller is told "error".
local requests = {}
local n = whole(ARGV[1], 1, MAX_BATCH)
local pos = 2
for r = 1, n or 0 do
  local request_id, hold_id, user = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2]
  local n_lines = whole(ARGV[pos + 4], 1, MAX_LINES)
  -- ':' is refused in request ids and users: "r:<user>:<request id>" must name one
  -- record, and "op:<id>" records of stock changes share the hash.
  if n_lines == nil or request_id == nil or request_id == '' or request_id:find(':', 1, true)
      or hold_id == nil or hold_id == '' or user == nil or user == '' or user:find(':', 1, true) then
    n = nil
    break
  end
  local lines = {}
  for i = 1, n_lines do
    lines[i] = {ARGV[pos + 3 + 2 * i], whole(ARGV[pos + 4 + 2 * i], 1, MAX_QTY)}
  end
  requests[r] = {request_id, hold_id, user, whole(ARGV[pos + 3], 1, MAX_TTL_MS), lines}
  pos = pos + 5 + 2 * n_lines
end
if n == nil or pos - 1 ~= #ARGV then return {{INVALID, 'bad_batch'}} end

local results = {}
for r, req in ipairs(requests) do
  results[r] = decide(req[1], req[2], req[3], req[4], req[5])
end
return results
