-- The fence's memory: what PostgreSQL knows about the Redis it trusts, so that a Redis
-- that comes back empty or older (a restart without its AOF, a failover to a lagging
-- replica) is noticed and sales are refused until `flashsale recover` rebuilds it.
-- Written by the fence guard in each service process and by `flashsale recover`
-- (flashsale/fence.py, flashsale/recovery.py).

-- One lineage token per key prefix: also stored in Redis at <prefix>:lineage. A Redis
-- that lacks it, or holds another one, is not the dataset these orders came from.
CREATE TABLE fence_lineage (
    prefix      text        PRIMARY KEY,
    token       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Each sale's settings and SKUs as the guard saw them in Redis: enough to put a sale
-- back (fenced, then rebuilt) when Redis has lost even its settings hash.
CREATE TABLE fence_sales (
    prefix       text        NOT NULL,
    sale         text        NOT NULL,
    settings     jsonb       NOT NULL,
    skus         text[]      NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    -- set by `flashsale recover --forget SALE`: the sale was removed from Redis on
    -- purpose, so its absence is not a loss
    forgotten_at timestamptz,
    PRIMARY KEY (prefix, sale)
);

-- Every fence raised and every recovery, with the evidence: the operator's trail.
CREATE TABLE fence_log (
    id      bigserial   PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    prefix  text        NOT NULL,
    sale    text,
    action  text        NOT NULL CHECK (action IN ('fenced', 'recovered', 'forgotten')),
    reason  text        NOT NULL DEFAULT '',
    detail  jsonb       NOT NULL DEFAULT '{}'
);

CREATE INDEX fence_log_sale ON fence_log (prefix, sale, at);
