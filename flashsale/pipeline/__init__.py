"""The order pipeline: what happens to a decision after Redis made it.

- ``writer``    the order writer: drains every sale's event stream into PostgreSQL,
                idempotently, XACK only after COMMIT, dead letters for what PostgreSQL refuses;
- ``sweeper``   the hold sweeper: lapses unpaid holds and settles bucket transfers;
- ``migrate``   versioned SQL migrations (``migrations/``);
- ``audit``     Redis and PostgreSQL compared after a sale: oversold, lost, duplicated, leaked;
- ``runner``    the worker process: signals, waiting for the stores, schema check,
                writer + sweeper side by side;
- ``cli``       ``flashsale migrate``, ``flashsale worker``, ``flashsale audit``.
"""
