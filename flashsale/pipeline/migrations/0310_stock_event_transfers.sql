-- A bucket transfer's id on the two stock events that record it (the donor's written_off,
-- the receiver's restocked; inventory/_events.py's optional "transfer" field). With it,
-- units written off under a transfer that no bucket received are visible in PostgreSQL
-- whatever Redis lost: the audit reports them as leaked, and recovery rebuilds each
-- bucket's transfer records from them, so a transfer cut by a data loss still finishes.

ALTER TABLE stock_events ADD COLUMN transfer text;
ALTER TABLE stock_events ADD CONSTRAINT stock_events_transfer_type
    CHECK (transfer IS NULL OR type IN ('restocked', 'written_off'));

CREATE INDEX stock_events_transfer ON stock_events (transfer) WHERE transfer IS NOT NULL;
