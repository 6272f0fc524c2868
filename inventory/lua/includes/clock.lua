-- Shared: the server's clock in milliseconds. Every script uses Redis's own clock, so
-- holds lapse at the same instant whichever service process asks.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
