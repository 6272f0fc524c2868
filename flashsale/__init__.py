"""flashsale: everything that runs around the ``inventory`` engine — one sub-package
("wing") per running role, and at this root only what every wing shares.

Wings (each may import this root and ``inventory``; a wing uses another wing only through
its public functions, never its internals):

- ``service/``   the aiohttp order service: app factory, the supervisor (``serve``),
                 admission, sales, tokens, metrics, buyer and admin APIs, probes, the
                 OpenAPI document, the fence guard, and ``warroom/`` (the operators' page);
- ``pipeline/``  the order writer (event streams → PostgreSQL), the hold sweeper,
                 migrations, the audit, and the worker process that runs writer + sweeper;
- ``fence/``     noticing that Redis lost data (``verify``: plain async, no aiohttp) and
                 rebuilding it from PostgreSQL (``recovery``, ``flashsale recover``);
- ``drills/``    the drill harness: rehearse, capacity, fault drills, the checker, the
                 fault proxy (not needed in production);
- ``runtime/``   embedded Redis, Redis Cluster and PostgreSQL servers for tests, try-outs
                 and drills (``flashsale servers``).

Shared root: ``cli`` (registers each wing's commands), ``settings``, ``logs``, ``keys``
(every service-level Redis key), ``redis_client`` (the one Redis client factory, reply
decoding, and the one test for a node of a Redis Cluster named as one server), ``pgpool`` (the asyncpg pool and what counts as a passing outage), ``streams``
(the writers' group, dead letters, backlog), ``exit_codes`` and ``console`` (what a command
prints and how it exits). The event-entry contract itself is ``inventory``'s.

A map with an order's way through the wings: ``docs/architecture.md``.
"""
