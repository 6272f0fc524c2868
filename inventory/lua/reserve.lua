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
hold, as the stream's contract says. The writes come after every decision, and Redis
refuses only a script's first write when out of memory, so a batch that meets a full
Redis writes nothing rather than part of itself.

KEYS[1] stock      hash  "<sku>:total|available|held|sold|reserve|limit|low"
KEYS[2] holds      hash  hold id -> JSON hold record
KEYS[3] requests   hash  "r:<user>:<request id>" -> JSON {h = hold id, f = fingerprint}
KEYS[4] users      hash  "<user>:<sku>" -> units held or bought (per-user limit)
KEYS[5] deadlines  zset  hold id scored by its deadline (ms)
KEYS[6] events     stream, one "reserved" entry per hold made

ARGV[1]   number of requests N
then N groups: request_id, hold_id, user, ttl_ms, n_lines, sku_1, qty_1, ..., sku_n, qty_n

Event entry: see inventory/_events.py (EVENT_FIELDS['reserved'])

Returns one element per request:
  deadline_ms                                           an integer: a hold made by this call
  {REPLAYED, hold_id, deadline_ms, state, created_ms}   same request id seen before
  {SOLD_OUT, sku, available}
  {LIMIT_EXCEEDED, sku, limit, already_counted}
  {UNKNOWN_SKU, sku}
  {INVALID, reason}
  {REQUEST_CONFLICT, hold_id}
A malformed batch (count, line counts or ids that do not match ARGV, a request id or user
with ':') writes nothing and returns the single result {{INVALID, 'bad_batch'}}.
A made hold is answered by its deadline alone: the client sent its id, knows its state
('held') and its creation time (the deadline less the TTL it sent), and an array of five
per reservation was ~9% of Redis's instructions per reservation (callgrind, issue 15).
Bounded: at most 1000 requests (MAX_BATCH) of at most 20 lines (MAX_LINES) per call.
]]
-- @include codes
-- @include clock
-- @include counts

local stock_key, holds_key, requests_key, users_key, deadlines_key, events_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
-- Per reservation, what costs is Lua's own work as much as Redis's: a number turned into
-- text (~0.4 µs), a pattern match, a table.concat, every string made (each is hashed,
-- interned, allocated and later swept) and every table built. So the same values are
-- converted once per batch (TTLs, quantities, deadlines, counts and each cart line's
-- texts repeat), JSON strings come from cjson.encode (the fastest way to quote one) or
-- are joined by hand from parts already known to need no escaping, the fingerprint is
-- only made when a request is compared with an earlier one, and the batch is kept in
-- columns rather than a table per request (issue 15: measured with callgrind, decide()
-- was a third of Redis's instructions per reservation).
local encode, format, concat, tonumber = cjson.encode, string.format, table.concat, tonumber

-- whole() of each distinct ARGV text once per batch (false: not a whole number in range).
local function whole_once(seen, value, low, high)
  local v = seen[value]
  if v == nil then
    v = whole(value, low, high) or false
    seen[value] = v
  end
  return v or nil
end
local ttls_seen, line_counts_seen, quantities_seen = {}, {}, {}
-- Per SKU: its JSON string, whether that needed no escaping, and per quantity the line's
-- texts "<sku>:<qty>" (events, fingerprints) and '["<sku>",<qty>]' (hold records).
local sku_jsons, sku_plain, line_texts_seen, line_jsons_seen = {}, {}, {}, {}

-- Parse the whole batch before deciding any request: a runtime error after one request
-- was decided would tell every caller "error" while its hold is about to be written.
-- Request r: request_ids[r], hold_ids[r], users[r], ttls[r] (nil: not valid),
-- record_fields[r], and its lines first_lines[r] .. last_lines[r]. Line k: skus[k],
-- qtys[k] (nil: not valid), line_texts[k] and line_jsons[k] (when qtys[k] is valid),
-- count_fields[k] ("<user>:<sku>").
local request_ids, hold_ids, users, ttls, record_fields, first_lines, last_lines = {}, {}, {}, {}, {}, {}, {}
local skus, qtys, line_texts, line_jsons, count_fields = {}, {}, {}, {}, {}
local n = whole(ARGV[1], 1, MAX_BATCH)
local pos, k = 2, 0
for r = 1, n or 0 do
  local request_id, hold_id, user, n_lines = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 4]
  n_lines = n_lines and whole_once(line_counts_seen, n_lines, 1, MAX_LINES)
  -- ':' is refused in request ids and users: "r:<user>:<request id>" must name one
  -- record, and "op:<id>" records of stock changes share the hash.
  if n_lines == nil or request_id == nil or request_id == '' or request_id:find(':', 1, true)
      or hold_id == nil or hold_id == '' or user == nil or user == '' or user:find(':', 1, true)
      or ARGV[pos + 4 + 2 * n_lines] == nil then
    n = nil
    break
  end
  request_ids[r], hold_ids[r], users[r] = request_id, hold_id, user
  ttls[r] = whole_once(ttls_seen, ARGV[pos + 3], 1, MAX_TTL_MS)
  record_fields[r] = 'r:' .. user .. ':' .. request_id
  first_lines[r], last_lines[r] = k + 1, k + n_lines
  for i = 1, n_lines do
    local sku, qty = ARGV[pos + 3 + 2 * i], whole_once(quantities_seen, ARGV[pos + 4 + 2 * i], 1, MAX_QTY)
    k = k + 1
    skus[k], qtys[k], count_fields[k] = sku, qty, user .. ':' .. sku
    if qty then
      local texts = line_texts_seen[sku]
      if texts == nil then
        local json = encode(sku)
        sku_jsons[sku], sku_plain[sku] = json, #json == #sku + 2
        texts = {}
        line_texts_seen[sku], line_jsons_seen[sku] = texts, {}
      end
      local text = texts[qty]
      if text == nil then
        local qty_text = format('%d', qty)
        text = sku .. ':' .. qty_text
        texts[qty] = text
        line_jsons_seen[sku][qty] = '[' .. sku_jsons[sku] .. ',' .. qty_text .. ']'
      end
      line_texts[k], line_jsons[k] = text, line_jsons_seen[sku][qty]
    end
  end
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

-- The values of fields[1..count] (false when absent), in the same order: one HMGET per
-- slice. Kept by position, not by name: the requests' and lines' columns index them.
local function read_all(key, fields, count)
  if count == 0 then return {} end
  local values = redis.call('HMGET', key, unpack(fields, 1, math.min(SLICE, count)))
  for i = SLICE + 1, count, SLICE do
    local got = redis.call('HMGET', key, unpack(fields, i, math.min(i + SLICE - 1, count)))
    for j = 1, #got do values[i + j - 1] = got[j] end
  end
  return values
end

-- Read: everything the batch may touch, one HMGET per hash.
local stock_fields, n_stock, listed = {}, 0, {}
for i = 1, k do
  local sku = skus[i]
  if not listed[sku] then
    listed[sku] = true
    stock_fields[n_stock + 1] = sku .. ':total'
    stock_fields[n_stock + 2] = sku .. ':available'
    stock_fields[n_stock + 3] = sku .. ':held'
    stock_fields[n_stock + 4] = sku .. ':limit'
    n_stock = n_stock + 4
  end
end
local records = read_all(requests_key, record_fields, n)
local holds_found = read_all(holds_key, hold_ids, n)
local counts = read_all(users_key, count_fields, k)
local stock = {}
for i, value in ipairs(read_all(stock_key, stock_fields, n_stock)) do stock[stock_fields[i]] = value end

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
-- Units "<user>:<sku>" of line k holds or bought: as read, or as this batch left them.
local counts_now, changed_counts, n_changed_counts = {}, {}, 0
local function counted(k)
  return counts_now[count_fields[k]] or tonumber(counts[k] or '0')
end

-- What the batch writes, gathered as it decides: field/value pairs of the holds and the
-- request records, score/member pairs of the deadlines, and per hold made (in order) its
-- request and its lines' text for the event.
local hold_writes, record_writes, deadline_writes, n_writes = {}, {}, {}, 0
local made_requests, made_lines, n_made = {}, {}, 0
-- What this batch made, seen by its later requests as if stored: hold id -> deadline,
-- record field -> the request that made it.
local made_holds, made_by = {}, {}

-- Request r's lines joined by sep: "<sku>:<qty>" each.
local function lines_joined(r, sep)
  local first, last = first_lines[r], last_lines[r]
  if first == last then return line_texts[first] end
  local parts = {}
  for i = first, last do parts[i - first + 1] = line_texts[i] end
  return concat(parts, sep)
end
-- The request's fingerprint, stored in its record: made only when compared.
local function fingerprint(r)
  return users[r] .. '|' .. lines_joined(r, '|')
end

local function decide(r)
  local ttl, first, last = ttls[r], first_lines[r], last_lines[r]
  if ttl == nil then return {INVALID, 'bad_ttl'} end
  for i = first, last do
    if qtys[i] == nil then return {INVALID, 'invalid_quantity'} end
    for j = first, i - 1 do
      if skus[j] == skus[i] then return {INVALID, 'duplicate_line'} end
    end
  end

  local hold_id, record_field = hold_ids[r], record_fields[r]
  local earlier = made_by[record_field]
  if earlier then
    local made = hold_ids[earlier]
    if fingerprint(earlier) ~= fingerprint(r) then return {REQUEST_CONFLICT, made} end
    return {REPLAYED, made, made_holds[made], 'held', now_text}
  end
  local seen = records[r]
  if seen then
    -- A record that does not decode, or names a hold that is gone, is refused rather
    -- than raised: an error here would tell every caller of the batch "error" while the
    -- holds decided before it are about to be written.
    local ok, first_outcome = pcall(cjson.decode, seen)
    if not ok or type(first_outcome) ~= 'table' or type(first_outcome.h) ~= 'string' then
      return {INVALID, 'bad_request_record'}
    end
    local first_hold = first_outcome.h
    if first_outcome.f ~= fingerprint(r) then return {REQUEST_CONFLICT, first_hold} end
    if made_holds[first_hold] then return {REPLAYED, first_hold, made_holds[first_hold], 'held', now_text} end
    local raw = redis.call('HGET', holds_key, first_hold)
    if not raw then return {INVALID, 'bad_request_record'} end
    local decoded, hold = pcall(cjson.decode, raw)
    if not decoded or type(hold) ~= 'table' then return {INVALID, 'bad_request_record'} end
    return {REPLAYED, first_hold, hold.d, hold.s, hold.c}
  end
  if holds_found[r] or made_holds[hold_id] then
    return {INVALID, 'hold_id_taken'}
  end

  -- Validate every line before the first change.
  for i = first, last do
    local sku, qty = skus[i], qtys[i]
    local row = sku_row(sku)
    if not row.exists then return {UNKNOWN_SKU, sku} end
    if row.available < qty then return {SOLD_OUT, sku, row.available} end
    if row.limit > 0 then
      local already = counted(i)
      if already + qty > row.limit then return {LIMIT_EXCEEDED, sku, row.limit, already} end
    end
  end

  -- Change the batch's view; the writes follow once every request is decided.
  local plain = true
  for i = first, last do
    local sku, qty, field = skus[i], qtys[i], count_fields[i]
    local row = rows[sku]
    if not row.changed then
      row.changed = true
      n_changed_skus = n_changed_skus + 1
      changed_skus[n_changed_skus] = sku
    end
    row.available = row.available - qty
    row.held = row.held + qty
    if counts_now[field] == nil then
      n_changed_counts = n_changed_counts + 1
      changed_counts[n_changed_counts] = field
    end
    counts_now[field] = counted(i) + qty
    plain = plain and sku_plain[sku]
  end
  local deadline_text = deadline_texts[ttl]
  if deadline_text == nil then
    deadline_text = format('%d', now + ttl)
    deadline_texts[ttl] = deadline_text
  end
  local user, request_id = users[r], request_ids[r]
  made_holds[hold_id] = deadline_text
  made_by[record_field] = r
  -- The hold record and the request record: the JSON cjson.encode would write for
  -- {u, l, s, d, c, r} and {h, f}, put together without building the tables. The
  -- fingerprint "<user>|<sku>:<qty>|…" is quoted by hand when the user and every SKU
  -- quoted alone needed no escaping (their JSON is two bytes longer), else by cjson.
  local user_json = encode(user)
  local lines_json, fingerprint_lines
  if first == last then
    lines_json, fingerprint_lines = line_jsons[first], line_texts[first]
  else
    local parts = {}
    for i = first, last do parts[i - first + 1] = line_jsons[i] end
    lines_json, fingerprint_lines = concat(parts, ','), lines_joined(r, '|')
  end
  local fingerprint_json
  if plain and #user_json == #user + 2 then
    fingerprint_json = '"' .. user .. '|' .. fingerprint_lines .. '"'
  else
    fingerprint_json = encode(user .. '|' .. fingerprint_lines)
  end
  hold_writes[n_writes + 1] = hold_id
  hold_writes[n_writes + 2] = '{"u":' .. user_json .. ',"l":[' .. lines_json .. '],"s":"held","d":"'
    .. deadline_text .. '","c":"' .. now_text .. '","r":' .. encode(request_id) .. '}'
  record_writes[n_writes + 1] = record_field
  record_writes[n_writes + 2] = '{"h":' .. encode(hold_id) .. ',"f":' .. fingerprint_json .. '}'
  deadline_writes[n_writes + 1] = deadline_text
  deadline_writes[n_writes + 2] = hold_id
  n_writes = n_writes + 2
  n_made = n_made + 1
  made_requests[n_made] = r
  made_lines[n_made] = first == last and fingerprint_lines or lines_joined(r, ',')
  return now + ttl
end

local results = {}
for r = 1, n do
  results[r] = decide(r)
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
  local count_writes, count_texts = {}, {}
  for i = 1, n_changed_counts do
    local field = changed_counts[i]
    local count = counts_now[field]
    local text = count_texts[count]
    if text == nil then
      text = format('%d', count)
      count_texts[count] = text
    end
    count_writes[2 * i - 1] = field
    count_writes[2 * i] = text
  end
  write_all('HSET', stock_key, stock_writes, 4 * n_changed_skus)
  write_all('HSET', users_key, count_writes, 2 * n_changed_counts)
  write_all('HSET', holds_key, hold_writes, n_writes)
  write_all('HSET', requests_key, record_writes, n_writes)
  write_all('ZADD', deadlines_key, deadline_writes, n_writes)
  for m = 1, n_made do
    local r = made_requests[m]
    redis.call('XADD', events_key, '*', 'type', 'reserved', 'order', hold_ids[r], 'user', users[r],
      'lines', made_lines[m], 'request', request_ids[r], 'deadline', deadline_texts[ttls[r]], 'at', now_text)
  end
end
return results
