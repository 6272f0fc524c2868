-- Shared: the records of a bucket transfer (inventory/_buckets.py). The donor's
-- "op:xo-<id>" and the receiver's "op:xi-<id>" live in each bucket's requests hash, as
-- stock operations do (see stock_ops): "adjust <sku> <delta>" once the units moved —
-- the form adjust.lua records, so a transfer begun by an older version reads the same —
-- or, on the donor only, "aborted" once the settle step gave the transfer up.
local TRANSFER_ABORTED = 'aborted'

local function transfer_op(requests_key, side, xfer)
  return redis.call('HGET', requests_key, 'op:' .. side .. '-' .. xfer)
end

local function transfer_op_record(requests_key, side, xfer, what)
  redis.call('HSET', requests_key, 'op:' .. side .. '-' .. xfer, what)
end

-- A transfer id: 1-64 of A-Z a-z 0-9 _ - (_buckets.py makes hex ones).
local function transfer_id_ok(xfer)
  return xfer ~= nil and #xfer <= 64 and string.match(xfer, '^[%w_-]+$') ~= nil
end
