-- Orders as the worker writes them from the sale streams: one row per hold (the order id
-- is the hold id), its lines, and its status. Rows are keyed on the order id so replaying
-- a stream entry never makes a second row. Deliberately no unique index on
-- (sale, request_id): the inventory engine already makes one hold per request id, and the
-- audit must be able to see a duplicate if a bug ever made one.

CREATE TABLE orders (
    order_id        text        PRIMARY KEY,
    sale            text        NOT NULL,
    user_id         text        NOT NULL,
    request_id      text        NOT NULL,
    status          text        NOT NULL
                    CHECK (status IN ('held', 'paid', 'cancelled', 'expired')),
    -- held = 0, every terminal status = 1: an update applies only when it raises the rank,
    -- so a late "reserved" entry never takes a paid order back to held.
    status_rank     smallint    NOT NULL CHECK (status_rank IN (0, 1)),
    CHECK ((status = 'held') = (status_rank = 0)),
    -- NULL until the "reserved" entry arrives (a terminal entry can be written first).
    created_at      timestamptz,
    pay_by          timestamptz NOT NULL,
    status_at       timestamptz NOT NULL,
    written_at      timestamptz NOT NULL DEFAULT now(),
    last_stream_id  text        NOT NULL
);

CREATE INDEX orders_sale_request ON orders (sale, request_id);
CREATE INDEX orders_sale_user ON orders (sale, user_id);

CREATE TABLE order_lines (
    order_id  text    NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE,
    sku       text    NOT NULL,
    qty       integer NOT NULL CHECK (qty > 0),
    PRIMARY KEY (order_id, sku)
);
