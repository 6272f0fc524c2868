-- Shared: result codes. inventory/_errors.py holds the same table and is the one
-- place that maps them to exceptions; tests check the two agree.
local OK = 0
local REPLAYED = 1
local SOLD_OUT = 10
local LIMIT_EXCEEDED = 11
local UNKNOWN_SKU = 12
local INVALID = 13
local REQUEST_CONFLICT = 14
local HOLD_NOT_FOUND = 20
local HOLD_EXPIRED = 21
local HOLD_CANCELLED = 22
local HOLD_PAID = 23
local SKU_EXISTS = 30
local INSUFFICIENT_STOCK = 31
