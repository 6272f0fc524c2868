-- Every stock change the sale streams carry besides orders: a SKU put on sale (with its
-- total, reserve pool and per-user limit), restocks and write-offs, reserve releases.
-- With the orders this is enough to rebuild a sale's stock after Redis loses data, and
-- it gives the audit totals and limits that do not depend on Redis.

CREATE TABLE stock_events (
    sale            text        NOT NULL,
    stream_id       text        NOT NULL,
    -- The stream id's two halves, so events sort in stream order (text order does not).
    stream_ms       bigint      GENERATED ALWAYS AS (split_part(stream_id, '-', 1)::bigint) STORED,
    stream_seq      bigint      GENERATED ALWAYS AS (split_part(stream_id, '-', 2)::bigint) STORED,
    type            text        NOT NULL
                    CHECK (type IN ('stocked', 'restocked', 'written_off', 'reserve_released')),
    sku             text        NOT NULL,
    total           integer,            -- stocked: units put on sale, reserve pool included
    reserve         integer,            -- stocked: units held back in the reserve pool
    per_user_limit  integer,            -- stocked: 0 = no limit
    low_stock_line  integer,            -- stocked
    delta           integer,            -- restocked (> 0) / written_off (< 0)
    units           integer,            -- reserve_released
    at              timestamptz NOT NULL,
    written_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sale, stream_id),
    CHECK (type <> 'stocked' OR (total >= 0 AND reserve >= 0 AND per_user_limit >= 0)),
    CHECK (type NOT IN ('restocked', 'written_off') OR delta IS NOT NULL),
    CHECK (type <> 'reserve_released' OR units >= 0)
);

CREATE INDEX stock_events_sku ON stock_events (sale, sku, stream_ms, stream_seq);
