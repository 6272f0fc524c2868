-- Sale generations. Every creation of a sale is a generation of its own, named by the
-- instant it was created (ms of the Redis server's clock; the sale settings hash's
-- "generation" field). A yearly id such as d11 is created again once the last one was
-- retired (`flashsale recover --forget d11`): the fence keeps one row per generation, so
-- retiring one creation never hides the next, and the fence, recovery and the audit read
-- only the rows of the generation they check. Orders and stock events need no column for
-- it: each row belongs to the newest generation of its sale created at or before the row
-- (an order's creation time, a stock event's stream id — both the Redis clock).
-- Rows recorded before this migration are generation 0.

ALTER TABLE fence_sales ADD COLUMN generation bigint NOT NULL DEFAULT 0;
ALTER TABLE fence_sales DROP CONSTRAINT fence_sales_pkey;
ALTER TABLE fence_sales ADD PRIMARY KEY (prefix, sale, generation);
