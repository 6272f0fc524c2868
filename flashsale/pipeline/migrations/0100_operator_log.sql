-- The operator log: every control pressed in the war room (open/close a sale, restock a
-- SKU, release a reserve pool, flip a switch), who pressed it, what was asked and what
-- the service answered — refused presses included. Written from the war room's Redis
-- outbox, keyed on the entry id so a re-sent entry never makes a second row.
-- No CHECK on action: an entry a newer service writes must never get stuck in the outbox.

CREATE TABLE operator_log (
    entry_id    text        PRIMARY KEY,
    at          timestamptz NOT NULL,
    operator    text        NOT NULL,
    action      text        NOT NULL,
    sale        text,
    sku         text,
    params      jsonb       NOT NULL DEFAULT '{}',
    status      smallint    NOT NULL,   -- the HTTP status the control answered
    outcome     text        NOT NULL,   -- 'ok' or the stable error code
    result      jsonb,                  -- the control's answer when it succeeded
    note        text        NOT NULL DEFAULT '',
    remote      text,
    user_agent  text,
    written_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX operator_log_at ON operator_log (at);
CREATE INDEX operator_log_sale ON operator_log (sale, at);
