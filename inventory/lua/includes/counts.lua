-- Shared: reading whole numbers from ARGV. tonumber() alone accepts 'inf', 'nan', '1e20',
-- '2.5' and '-0'; a counter written from such a value ('inf', '1e+20') breaks every later
-- HINCRBY, so scripts accept only whole numbers within the same bounds as
-- inventory/_validate.py (tests check the two agree) and refuse anything else before
-- their first write.
local MAX_UNITS = 1000000000
local MAX_QTY = 10000
local MAX_LINES = 20
local MAX_TTL_MS = 604800000
local MAX_BATCH = 1000

-- The whole number in value if low <= it <= high, else nil.
local function whole(value, low, high)
  local n = tonumber(value)
  if n == nil or n ~= n or n < low or n > high or n ~= math.floor(n) then return nil end
  return n + 0  -- turns -0 into 0
end
