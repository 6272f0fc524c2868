"""The fence: sales stop when Redis comes back without its data (or with older data) and
stay stopped until recovery has rebuilt the stock from PostgreSQL.

- ``verify``     how a loss is noticed (lineage marker, hold records, sold counters,
                 stream ids) and how a sale is fenced — plain async, no aiohttp;
- ``recovery``   rebuild a sale in Redis from PostgreSQL, then reopen it;
- ``cli``        ``flashsale recover``.

The per-process guard that applies the fence to requests is the service's
(``flashsale.service.fence_guard``).
"""
