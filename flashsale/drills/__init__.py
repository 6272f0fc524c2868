"""The drill harness (not needed in production): prove the guarantees under load and faults.

- ``rehearse``    the one-command rehearsal: servers, service, worker, Locust, verdict;
- ``drill``       fault drills: a short surge with one part of the stack broken mid-surge;
- ``checker``     a Jepsen-style history of every request, checked against PostgreSQL and Redis;
- ``faultproxy``  a TCP proxy that adds latency, resets or blackholes connections;
- ``cli``         ``flashsale rehearse``, ``flashsale capacity``, ``flashsale drill``.
"""
