"""Real servers on loopback for tests, try-outs and drills: Valkey / Redis and PostgreSQL
(from wheels or PATH), each on a free port in its own temp dir.

- ``engines``   which Redis-protocol server runs: Valkey from its wheel unless
  ``FLASHSALE_REDIS_ENGINE`` says otherwise;
- ``embedded``  one Redis server, one PostgreSQL server, and the stack of both;
- ``cluster``   a three-master Redis Cluster of one engine;
- ``cli``       ``flashsale servers``.
"""
