"""The order pipeline: what happens to a decision after Redis made it.

The order writer, one concern a module:

- ``writer``           its loop: what happens when, PostgreSQL and Redis outages, stopping,
                       the stats it publishes;
- ``backlog``          its side of the sale streams: joining the writers' group, reading,
                       re-reading its own pending entries, claiming idle ones, XACK only after
                       COMMIT, dead letters, XTRIM MINID below what is committed;
- ``entries``          a stream entry and the order or stock change it records (read through
                       inventory's entry contract);
- ``order_sql``        the changes written to PostgreSQL in one idempotent statement per batch
                       (also what fence recovery writes through);
- ``worker_settings``  the worker's settings (``FLASHSALE_WORKER_*``, ``FLASHSALE_SWEEPER_*``).

Around it:

- ``sweeper``   the hold sweeper: lapses unpaid holds and settles bucket transfers;
- ``migrate``   versioned SQL migrations (``migrations/``);
- ``audit``     Redis and PostgreSQL compared after a sale: oversold, lost, duplicated, leaked;
- ``runner``    the worker process: signals, waiting for the stores, schema check,
                writer + sweeper side by side;
- ``cli``       ``flashsale migrate``, ``flashsale worker``, ``flashsale audit``.
"""
