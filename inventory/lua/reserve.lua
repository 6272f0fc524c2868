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
written with one HSET (the deadlines with one ZADD), and the holds made are one stream
entry, "reserved_batch", one field per hold: hold id -> "<user> <lines> <request id>
<deadline ms>". Redis charges ~1,600 instructions per argument of a command a script runs
(its object, the AOF feed, the listpack insert, the free): one "reserved" entry of six
fields per hold was over a third of this script's instructions (callgrind, embedded Valkey,
batches of 64, 3,200 reservations: 327.0M with one XADD per hold, 210.2M with none, 230.5M
with one packed entry per call, 276.0M with one entry per call of five fields per hold;
this script as written, its packed values made as it decides: 225.3M).
So no id may hold a space: the client refuses one, and a batch with one is malformed here.
The writes come after every decision, and Redis refuses only a script's first write when
out of memory, so a batch that meets a full Redis writes nothing rather than part of itself.

KEYS[1] stock      hash  "<sku>:total|available|held|sold|reserve|limit|low"
KEYS[2] holds      hash  hold id -> JSON hold record
KEYS[3] requests   hash  "r:<user>:<request id>" -> JSON {h = hold id, f = fingerprint}
KEYS[4] users      hash  "<user>:<sku>" -> units held or bought (per-user limit)
KEYS[5] deadlines  zset  hold id scored by its deadline (ms)
KEYS[6] events     stream, one "reserved_batch" entry per call that made a hold

ARGV[1]   number of requests N
then N groups: request_id, hold_id, user, ttl_ms, n_lines, sku_1, qty_1, ..., sku_n, qty_n

Event entry: see inventory/_events.py (EVENT_FIELDS['reserved_batch'])

Returns one element per request:
  deadline_ms                                           an integer: a hold made by this call
  {REPLAYED, hold_id, deadline_ms, state, created_ms}   same request id seen before
  {SOLD_OUT, sku, available}
  {LIMIT_EXCEEDED, sku, limit, already_counted}
  {UNKNOWN_SKU, sku}
  {INVALID, reason}
  {REQUEST_CONFLICT, hold_id}
A malformed batch (count, line counts or ids that do not match ARGV, a request id or user
with ':', a space anywhere, a hold id 'type' or 'at') writes nothing and returns the single result {{INVALID, 'bad_batch'}}.
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
-- Per reservation, what costs is Lua's own work as much as Redis's (issue 15, callgrind):
-- every table slot written (~300 instructions), every Lua function call (~700), a C one
-- such as tonumber() (~1,300 with its strtod), every string made (each is hashed,
-- interned, allocated and later swept: ~1,200 for a short one), a pattern match. So the
-- same values are converted once per batch (TTLs, quantities, deadlines, counts and each
-- cart line's texts repeat: memo tables, plain tables once filled), the JSON records are
-- joined by hand in one concatenation each, the fingerprint is only made when a request
-- is compared with an earlier one, and a request's ids, TTL and lines are read from ARGV
-- where they are, not copied into columns: only what an HMGET needs (hold ids, record
-- fields, count fields) is gathered.
local encode, format, concat, find, tonumber = cjson.encode, string.format, table.concat, string.find, tonumber
local call, argv = redis.call, ARGV

-- A table that fills itself: memo[value] is make(value), computed on the first read.
local function memo(make)
  return setmetatable({}, {__index = function(seen, value)
    local made = make(value)
    seen[value] = made
    return made
  end})
end
-- whole() of each distinct ARGV text (false: not a whole number in range).
local line_counts = memo(function(text) return whole(text, 1, MAX_LINES) or false end)
local ttls = memo(function(text) return whole(text, 1, MAX_TTL_MS) or false end)
local quantities = memo(function(text) return whole(text, 1, MAX_QTY) or false end)
-- Per SKU and quantity: the line's text "<sku>:<qty>" (events, fingerprints) and its JSON
-- '["<sku>",<qty>]' (hold records).
local line_texts = memo(function(sku)
  return memo(function(qty) return sku .. ':' .. format('%d', qty) end)
end)
local line_jsons = memo(function(sku)
  local sku_json = encode(sku)
  return memo(function(qty) return '[' .. sku_json .. ',' .. format('%d', qty) .. ']' end)
end)

-- The batch's text, all ARGV joined: one cjson pass over it tells whether any user,
-- request id, hold id or SKU needs escaping, and one plain search whether any has a ':'.
-- Another refuses a space anywhere: the event entry packs each hold's values with spaces.
-- The library sends neither (inventory/_validate.py), so then the records quote each value
-- by hand and no id is searched again; otherwise cjson quotes each value and every id is
-- searched for ':'. Once per batch, this is cheaper than any per-value check.
local argv_text = concat(argv)
local argv_plain = #encode(argv_text) == #argv_text + 2
local argv_colons = find(argv_text, ':', 1, true) ~= nil
if find(argv_text, ' ', 1, true) then return {{INVALID, 'bad_batch'}} end
argv_text = nil

-- Parse the whole batch before deciding any request: a runtime error after one request
-- was decided would tell every caller "error" while its hold is about to be written.
-- Request r is at argv[pos]: request_id, hold_id, user, ttl, n_lines, then n_lines pairs
-- sku, qty; its lines are k + 1 .. k + n_lines of the batch. Gathered for the reads:
-- hold_ids[r], record_fields[r] ("r:<user>:<request id>"), count_fields[k]
-- ("<user>:<sku>"), and each SKU's stock fields.
local hold_ids, record_fields, count_fields = {}, {}, {}
local stock_fields, n_stock = {}, 0
local n = whole(argv[1], 1, MAX_BATCH)
local pos, k = 2, 0
for r = 1, n or 0 do
  local request_id, hold_id, user, n_lines = argv[pos], argv[pos + 1], argv[pos + 2], argv[pos + 4]
  n_lines = n_lines and line_counts[n_lines]
  -- (With n_lines present, so are the three ids before it.) ':' is refused in request ids
  -- and users: "r:<user>:<request id>" must name one record, and "op:<id>" records of
  -- stock changes share the hash. A hold id names its field of the event entry, beside
  -- 'type' and 'at'.
  if not n_lines or request_id == '' or hold_id == '' or user == '' or hold_id == 'type' or hold_id == 'at'
      or argv[pos + 4 + 2 * n_lines] == nil
      or argv_colons and (find(request_id, ':', 1, true) or find(user, ':', 1, true)) then
    n = nil
    break
  end
  hold_ids[r], record_fields[r] = hold_id, 'r:' .. user .. ':' .. request_id
  for at = pos + 5, pos + 3 + 2 * n_lines, 2 do
    local sku = argv[at]
    k = k + 1
    count_fields[k] = user .. ':' .. sku
    if stock_fields[sku] == nil then
      stock_fields[sku] = true
      stock_fields[n_stock + 1] = sku .. ':total'
      stock_fields[n_stock + 2] = sku .. ':available'
      stock_fields[n_stock + 3] = sku .. ':held'
      stock_fields[n_stock + 4] = sku .. ':limit'
      n_stock = n_stock + 4
    end
  end
  pos = pos + 5 + 2 * n_lines
end
if n == nil or pos - 1 ~= #argv then return {{INVALID, 'bad_batch'}} end

-- Lua's unpack() stops at a few thousand values: a big batch's reads and writes travel
-- in slices of SLICE arguments (even, so field/value pairs stay together).
local SLICE = 4000

local function write_all(command, key, args, count)
  for i = 1, count, SLICE do
    call(command, key, unpack(args, i, math.min(i + SLICE - 1, count)))
  end
end

-- The values of fields[1..count] (false when absent), in the same order: one HMGET per
-- slice. Kept by position, not by name: the requests' and lines' columns index them.
local function read_all(key, fields, count)
  if count == 0 then return {} end
  local values = call('HMGET', key, unpack(fields, 1, math.min(SLICE, count)))
  for i = SLICE + 1, count, SLICE do
    local got = call('HMGET', key, unpack(fields, i, math.min(i + SLICE - 1, count)))
    for j = 1, #got do values[i + j - 1] = got[j] end
  end
  return values
end

-- Read: everything the batch may touch, one HMGET per hash.
local records = read_all(requests_key, record_fields, n)
local holds_found = read_all(holds_key, hold_ids, n)
local counts = read_all(users_key, count_fields, k)
local stock = {}
for i, value in ipairs(read_all(stock_key, stock_fields, n_stock)) do stock[stock_fields[i]] = value end

local now = now_ms()
local now_text = format('%d', now)
local deadline_texts = memo(function(ttl) return format('%d', now + ttl) end)

-- The batch's view of each SKU it touches, kept in step with every hold it makes.
local changed_skus, n_changed_skus = {}, 0
local rows = memo(function(sku)
  return {exists = stock[sku .. ':total'] ~= false, available = tonumber(stock[sku .. ':available'] or '0'),
    held = tonumber(stock[sku .. ':held'] or '0'), limit = tonumber(stock[sku .. ':limit'] or '0')}
end)
-- Units "<user>:<sku>" of line k holds or bought: as read, or as this batch left them.
local counts_now, changed_counts, n_changed_counts = {}, {}, 0
local function counted(k)
  return counts_now[count_fields[k]] or tonumber(counts[k] or '0')
end

-- What the batch writes, gathered as it decides: field/value pairs of the holds, the
-- request records and the event entry, score/member pairs of the deadlines.
local hold_writes, record_writes, deadline_writes, event_writes, n_writes = {}, {}, {}, {}, 0
-- What this batch made, seen by its later requests as if stored: hold id -> deadline,
-- record field -> the request that made it (so request r made a hold if made_by of its
-- record field is r).
local made_holds, made_by = {}, {}
-- Values stand in the records as they are between quotes q when the batch needs no
-- escaping; else each is cjson's JSON string and q is empty.
local q = argv_plain and '"' or ''

-- The lines of the request at argv[at] joined by sep: "<sku>:<qty>" each.
local function lines_joined(at, sep)
  local n_lines = line_counts[argv[at + 4]]
  if n_lines == 1 then return line_texts[argv[at + 5]][quantities[argv[at + 6]]] end
  local parts = {}
  for i = 1, n_lines do parts[i] = line_texts[argv[at + 3 + 2 * i]][quantities[argv[at + 4 + 2 * i]]] end
  return concat(parts, sep)
end
-- The request's fingerprint, stored in its record: made only when compared.
local function fingerprint(at)
  return argv[at + 2] .. '|' .. lines_joined(at, '|')
end

-- Request r, at argv[at], its lines first .. last of the batch and its TTL (false: not
-- valid): its reply if it makes no hold (a refusal, or the hold an earlier call or
-- request made), else nil. Making the hold is done in the batch's loop below, not in a
-- function: a call costs ~700 instructions, and each of the batch's tables the making
-- writes would be an upvalue there, one more instruction per use.
local starts = {}
local function refusal(r, at, first, last, ttl)
  if not ttl then return {INVALID, 'bad_ttl'} end
  for i = at + 6, at + 4 + 2 * (last - first + 1), 2 do
    if not quantities[argv[i]] then return {INVALID, 'invalid_quantity'} end
    for j = at + 5, i - 3, 2 do
      if argv[j] == argv[i - 1] then return {INVALID, 'duplicate_line'} end
    end
  end

  local hold_id, record_field = hold_ids[r], record_fields[r]
  local earlier = made_by[record_field]
  if earlier then
    local made = hold_ids[earlier]
    if fingerprint(starts[earlier]) ~= fingerprint(at) then return {REQUEST_CONFLICT, made} end
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
    if first_outcome.f ~= fingerprint(at) then return {REQUEST_CONFLICT, first_hold} end
    if made_holds[first_hold] then return {REPLAYED, first_hold, made_holds[first_hold], 'held', now_text} end
    local raw = call('HGET', holds_key, first_hold)
    if not raw then return {INVALID, 'bad_request_record'} end
    local decoded, hold = pcall(cjson.decode, raw)
    if not decoded or type(hold) ~= 'table' then return {INVALID, 'bad_request_record'} end
    return {REPLAYED, first_hold, hold.d, hold.s, hold.c}
  end
  if holds_found[r] or made_holds[hold_id] then
    return {INVALID, 'hold_id_taken'}
  end

  -- Validate every line before the first change. Line i of the batch is at argv[a].
  for i = first, last do
    local a = at + 5 + 2 * (i - first)
    local sku, qty = argv[a], quantities[argv[a + 1]]
    local row = rows[sku]
    if not row.exists then return {UNKNOWN_SKU, sku} end
    if row.available < qty then return {SOLD_OUT, sku, row.available} end
    if row.limit > 0 then
      local already = counted(i)
      if already + qty > row.limit then return {LIMIT_EXCEEDED, sku, row.limit, already} end
    end
  end
  return nil
end

local results = {}
pos, k = 2, 0
for r = 1, n do
  local at, first, n_lines = pos, k + 1, line_counts[argv[pos + 4]]
  local last, ttl = k + n_lines, ttls[argv[pos + 3]]
  pos, k = pos + 5 + 2 * n_lines, k + n_lines
  starts[r] = at
  local refused = refusal(r, at, first, last, ttl)
  if refused then
    results[r] = refused
  else
    -- Make the hold: change the batch's view; the writes follow once every request is
    -- decided. The hold record's lines '["<sku>",<qty>]' are joined on the way.
    local hold_id, record_field = hold_ids[r], record_fields[r]
    local lines_json, fingerprint_lines, parts = nil, nil, nil
    for i = first, last do
      local a = at + 5 + 2 * (i - first)
      local sku, qty, field = argv[a], quantities[argv[a + 1]], count_fields[i]
      local row = rows[sku]
      if not row.changed then
        row.changed = true
        n_changed_skus = n_changed_skus + 1
        changed_skus[n_changed_skus] = sku
      end
      row.available = row.available - qty
      row.held = row.held + qty
      local count = counts_now[field]
      if count == nil then
        n_changed_counts = n_changed_counts + 1
        changed_counts[n_changed_counts] = field
        count = counts[i]  -- tonumber('0') for each new buyer would be a C call and a strtod
        count = count and tonumber(count) or 0
      end
      counts_now[field] = count + qty
      if first == last then
        lines_json, fingerprint_lines = line_jsons[sku][qty], line_texts[sku][qty]
      else
        parts = parts or {}
        parts[i - first + 1] = line_jsons[sku][qty]
      end
    end
    if parts then lines_json, fingerprint_lines = concat(parts, ','), lines_joined(at, '|') end
    local event_lines = parts and lines_joined(at, ',') or fingerprint_lines
    local deadline_text = deadline_texts[ttl]
    made_holds[hold_id] = deadline_text
    made_by[record_field] = r
    -- The hold record and the request record: the JSON cjson.encode would write for
    -- {u, l, s, d, c, r} and {h, f}, put together without building the tables. The
    -- fingerprint is "<user>|<sku>:<qty>|…".
    local user, request_id = argv[at + 2], argv[at]
    local user_json, request_json, hold_json = user, request_id, hold_id
    local fingerprint_json, bar = user, '|'
    if not argv_plain then
      user_json, request_json, hold_json = encode(user), encode(request_id), encode(hold_id)
      fingerprint_json, bar, fingerprint_lines = encode(user .. '|' .. fingerprint_lines), '', ''
    end
    hold_writes[n_writes + 1] = hold_id
    hold_writes[n_writes + 2] = '{"u":' .. q .. user_json .. q .. ',"l":[' .. lines_json .. '],"s":"held","d":"'
      .. deadline_text .. '","c":"' .. now_text .. '","r":' .. q .. request_json .. q .. '}'
    record_writes[n_writes + 1] = record_field
    record_writes[n_writes + 2] = '{"h":' .. q .. hold_json .. q .. ',"f":' .. q .. fingerprint_json
      .. bar .. fingerprint_lines .. q .. '}'
    deadline_writes[n_writes + 1] = deadline_text
    deadline_writes[n_writes + 2] = hold_id
    event_writes[n_writes + 1] = hold_id
    event_writes[n_writes + 2] = user .. ' ' .. event_lines .. ' ' .. request_id .. ' ' .. deadline_text
    n_writes = n_writes + 2
    results[r] = now + ttl
  end
end

-- Write: one command per hash for the whole batch, then one event entry for its holds.
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
  local count_texts = memo(function(count) return format('%d', count) end)
  for i = 1, n_changed_counts do
    local field = changed_counts[i]
    count_writes[2 * i - 1] = field
    count_writes[2 * i] = count_texts[counts_now[field]]
  end
  write_all('HSET', stock_key, stock_writes, 4 * n_changed_skus)
  write_all('HSET', users_key, count_writes, 2 * n_changed_counts)
  write_all('HSET', holds_key, hold_writes, n_writes)
  write_all('HSET', requests_key, record_writes, n_writes)
  write_all('ZADD', deadlines_key, deadline_writes, n_writes)
  -- One entry, not sliced: at most 2 x MAX_BATCH = 2,000 values, well below what unpack()
  -- can put on Lua 5.1's stack (LUAI_MAXCSTACK, 8,000), and readers take an entry whole.
  redis.call('XADD', events_key, '*', 'type', 'reserved_batch', 'at', now_text,
    unpack(event_writes, 1, n_writes))
end
return results
