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

Cost: Redis charges per command a script runs, so the batch is read once and written
once. Every hash is read with one HMGET for the whole batch (requests, holds, users,
stock), the requests are decided in memory against that view, and then each hash is
written with one HSET (the deadlines with one ZADD); only the events are one XADD per
hold, as the stream's contract says. A write that fails fails on the first one (Redis
refuses a script's first write when out of memory), so a batch is written whole or not
at all.

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

local stock_key, holds_key, requests_key, users_key, deadlines_key, events_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
-- Per reservation, what costs is Lua's own work more than Redis's: a number turned into
-- text (~0.4 µs), a pattern match, a table.concat. So the same values are converted once
-- per batch (TTLs, quantities and deadlines repeat), JSON strings come from cjson.encode
-- (the fastest way to quote one) and a one-line cart, the usual one, is joined by hand.
local encode, format, concat, tostring = cjson.encode, string.format, table.concat, tostring

-- whole() of each distinct ARGV text once per batch: false when it is not one.
local function whole_once(seen, value, low, high)
  if value == nil then return nil end
  local v = seen[value]
  if v == nil then
    v = whole(value, low, high) or false
    seen[value] = v
  end
  return v or nil
end
local ttls, line_counts, quantities, quantity_texts = {}, {}, {}, {}

-- Parse the whole batch before deciding any request: a runtime error after one request
-- was decided would tell every caller "error" while its hold is about to be written.
-- A request: {request id, hold id, user, ttl, lines, record field}; a line: {sku, qty,
-- qty as text}.
local requests = {}
local n = whole(ARGV[1], 1, MAX_BATCH)
local pos = 2
for r = 1, n or 0 do
  local request_id, hold_id, user = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2]
  local n_lines = whole_once(line_counts, ARGV[pos + 4], 1, MAX_LINES)
  -- ':' is refused in request ids and users: "r:<user>:<request id>" must name one
  -- record, and "op:<id>" records of stock changes share the hash.
  if n_lines == nil or request_id == nil or request_id == '' or request_id:find(':', 1, true)
      or hold_id == nil or hold_id == '' or user == nil or user == '' or user:find(':', 1, true) then
    n = nil
    break
  end
  local lines = {}
  for i = 1, n_lines do
    local qty = whole_once(quantities, ARGV[pos + 4 + 2 * i], 1, MAX_QTY)
    local qty_text = qty and quantity_texts[qty]
    if qty and not qty_text then
      qty_text = format('%d', qty)
      quantity_texts[qty] = qty_text
    end
    lines[i] = {ARGV[pos + 3 + 2 * i], qty, qty_text}
  end
  requests[r] = {request_id, hold_id, user, whole_once(ttls, ARGV[pos + 3], 1, MAX_TTL_MS), lines,
    'r:' .. user .. ':' .. request_id}
  pos = pos + 5 + 2 * n_lines
end
if n == nil or pos - 1 ~= #ARGV then return {{INVALID, 'bad_batch'}} end

-- Lua's unpack() stops at a few thousand values: a big batch's reads and writes travel
-- in slices of SLICE arguments (even, so field/value pairs stay together).
local SLICE = 4000

local function write_all(command, key, args, count)
  for i = 1, count, SLICE do
    redis.call(command, key, unpack(args, i, math.min(i + SLICE - 1, count)))
  end
end

-- field -> value (false when absent) for every field named, one HMGET per slice.
local function read_all(key, fields, count)
  local values = {}
  for i = 1, count, SLICE do
    local got = redis.call('HMGET', key, unpack(fields, i, math.min(i + SLICE - 1, count)))
    for j = 1, #got do values[fields[i + j - 1]] = got[j] end
  end
  return values
end

-- Read: everything the batch may touch, one HMGET per hash.
local record_fields, hold_ids, count_fields, stock_fields = {}, {}, {}, {}
local n_counts, n_stock = 0, 0
local listed = {}
for r = 1, n do
  local req = requests[r]
  record_fields[r] = req[6]
  hold_ids[r] = req[2]
  local user, lines = req[3], req[5]
  for i = 1, #lines do
    local sku = lines[i][1]
    local field = user .. ':' .. sku
    if not listed[field] then
      listed[field] = true
      n_counts = n_counts + 1
      count_fields[n_counts] = field
    end
    if not listed[sku] then
      listed[sku] = true
      stock_fields[n_stock + 1] = sku .. ':total'
      stock_fields[n_stock + 2] = sku .. ':available'
      stock_fields[n_stock + 3] = sku .. ':held'
      stock_fields[n_stock + 4] = sku .. ':limit'
      n_stock = n_stock + 4
    end
  end
end
local records = read_all(requests_key, record_fields, n)
local holds_found = read_all(holds_key, hold_ids, n)
local counts = read_all(users_key, count_fields, n_counts)
local stock = read_all(stock_key, stock_fields, n_stock)

local now = now_ms()
local now_text = format('%d', now)
local deadline_texts = {}

-- The batch's view of each SKU it touches, kept in step with every hold it makes.
local rows, changed_skus, n_changed_skus = {}, {}, 0
local function sku_row(sku)
  local row = rows[sku]
  if row == nil then
    row = {exists = stock[sku .. ':total'] ~= false, available = tonumber(stock[sku .. ':available'] or '0'),
      held = tonumber(stock[sku .. ':held'] or '0'), limit = tonumber(stock[sku .. ':limit'] or '0')}
    rows[sku] = row
  end
  return row
end
-- Units each "<user>:<sku>" holds or bought, as numbers once read.
local changed_counts, n_changed_counts = {}, 0
local function counted(field)
  local c = counts[field]
  if type(c) ~= 'number' then
    c = tonumber(c or '0')
    counts[field] = c
  end
  return c
end

-- What the batch writes, gathered as it decides: field/value pairs of the holds and the
-- request records, score/member pairs of the deadlines, and five values per event.
local hold_writes, record_writes, deadline_writes, events, n_writes, n_events = {}, {}, {}, {}, 0, 0
-- Holds (id -> deadline) and request records (field -> {hold id, fingerprint}) this batch
-- made: a later request of the batch sees them as if they were stored.
local made_holds, made_records = {}, {}

local function decide(req)
  local request_id, hold_id, user, ttl, lines, record_field = req[1], req[2], req[3], req[4], req[5], req[6]
  if ttl == nil then return {INVALID, 'bad_ttl'} end
  local n_lines = #lines
  local lines_text
  for i = 1, n_lines do
    local line = lines[i]
    if line[2] == nil then return {INVALID, 'invalid_quantity'} end
    for j = 1, i - 1 do
      if lines[j][1] == line[1] then return {INVALID, 'duplicate_line'} end
    end
  end
  if n_lines == 1 then
    lines_text = lines[1][1] .. ':' .. lines[1][3]
  else
    local parts = {}
    for i = 1, n_lines do parts[i] = lines[i][1] .. ':' .. lines[i][3] end
    lines_text = concat(parts, ',')
  end
  -- user|<sku>:<qty>|...: the same text as lines_text, '|' for ','.
  local fingerprint = user .. '|' .. (n_lines == 1 and lines_text or lines_text:gsub(',', '|'))

  local made = made_records[record_field]
  if made then
    if made[2] ~= fingerprint then return {REQUEST_CONFLICT, made[1]} end
    return {REPLAYED, made[1], made_holds[made[1]], 'held', now_text}
  end
  local seen = records[record_field]
  if seen then
    -- A record that does not decode, or names a hold that is gone, is refused rather
    -- than raised: an error here would tell every caller of the batch "error" while the
    -- holds decided before it are about to be written.
    local ok, first = pcall(cjson.decode, seen)
    if not ok or type(first) ~= 'table' or type(first.h) ~= 'string' then
      return {INVALID, 'bad_request_record'}
    end
    if first.f ~= fingerprint then return {REQUEST_CONFLICT, first.h} end
    if made_holds[first.h] then return {REPLAYED, first.h, made_holds[first.h], 'held', now_text} end
    local raw = redis.call('HGET', holds_key, first.h)
    if not raw then return {INVALID, 'bad_request_record'} end
    local decoded, hold = pcall(cjson.decode, raw)
    if not decoded or type(hold) ~= 'table' then return {INVALID, 'bad_request_record'} end
    return {REPLAYED, first.h, hold.d, hold.s, hold.c}
  end
  if holds_found[hold_id] or made_holds[hold_id] then
    return {INVALID, 'hold_id_taken'}
  end

  -- Validate every line before the first change.
  for i = 1, n_lines do
    local sku, qty = lines[i][1], lines[i][2]
    local row = sku_row(sku)
    if not row.exists then return {UNKNOWN_SKU, sku} end
    if row.available < qty then return {SOLD_OUT, sku, row.available} end
    if row.limit > 0 then
      local already = counted(user .. ':' .. sku)
      if already + qty > row.limit then return {LIMIT_EXCEEDED, sku, row.limit, already} end
    end
  end

  -- Change the batch's view; the writes follow once every request is decided.
  local record_lines
  for i = 1, n_lines do
    local line = lines[i]
    local sku, qty = line[1], line[2]
    local row = rows[sku]
    if not row.changed then
      row.changed = true
      n_changed_skus = n_changed_skus + 1
      changed_skus[n_changed_skus] = sku
    end
    row.available = row.available - qty
    row.held = row.held + qty
    local field = user .. ':' .. sku
    if changed_counts[field] == nil then
      changed_counts[field] = true
      n_changed_counts = n_changed_counts + 1
      changed_counts[n_changed_counts] = field
    end
    counts[field] = counted(field) + qty
    local record_line = '[' .. encode(sku) .. ',' .. line[3] .. ']'
    record_lines = record_lines and (record_lines .. ',' .. record_line) or record_line
  end
  local deadline_text = deadline_texts[ttl]
  if deadline_text == nil then
    deadline_text = format('%d', now + ttl)
    deadline_texts[ttl] = deadline_text
  end
  made_holds[hold_id] = deadline_text
  made_records[record_field] = {hold_id, fingerprint}
  -- The hold record and the request record: the JSON cjson.encode would write for
  -- {u, l, s, d, c, r} and {h, f}, put together without building the tables.
  hold_writes[n_writes + 1] = hold_id
  hold_writes[n_writes + 2] = '{"u":' .. encode(user) .. ',"l":[' .. record_lines .. '],"s":"held","d":"'
    .. deadline_text .. '","c":"' .. now_text .. '","r":' .. encode(request_id) .. '}'
  record_writes[n_writes + 1] = record_field
  record_writes[n_writes + 2] = '{"h":' .. encode(hold_id) .. ',"f":' .. encode(fingerprint) .. '}'
  deadline_writes[n_writes + 1] = deadline_text
  deadline_writes[n_writes + 2] = hold_id
  n_writes = n_writes + 2
  events[n_events + 1] = hold_id
  events[n_events + 2] = user
  events[n_events + 3] = lines_text
  events[n_events + 4] = request_id
  events[n_events + 5] = deadline_text
  n_events = n_events + 5
  return {OK, hold_id, deadline_text, 'held', now_text}
end

local results = {}
for r = 1, n do
  results[r] = decide(requests[r])
end

-- Write: one command per hash for the whole batch, then one event per hold.
if n_writes > 0 then
  local stock_writes = {}
  for i = 1, n_changed_skus do
    local sku = changed_skus[i]
    local row = rows[sku]
    stock_writes[4 * i - 3] = sku .. ':available'
    stock_writes[4 * i - 2] = format('%d', row.available)
    stock_writes[4 * i - 1] = sku .. ':held'
    stock_writes[4 * i] = format('%d', row.held)
  end
  local count_writes = {}
  for i = 1, n_changed_counts do
    local field = changed_counts[i]
    count_writes[2 * i - 1] = field
    count_writes[2 * i] = format('%d', counts[field])
  end
  write_all('HSET', stock_key, stock_writes, 4 * n_changed_skus)
  write_all('HSET', users_key, count_writes, 2 * n_changed_counts)
  write_all('HSET', holds_key, hold_writes, n_writes)
  write_all('HSET', requests_key, record_writes, n_writes)
  write_all('ZADD', deadlines_key, deadline_writes, n_writes)
  for e = 1, n_events, 5 do
    redis.call('XADD', events_key, '*', 'type', 'reserved', 'order', events[e], 'user', events[e + 1],
      'lines', events[e + 2], 'request', events[e + 3], 'deadline', events[e + 4], 'at', now_text)
  end
end
return results
