"""The war room: the live page operators watch during a sale.

- ``routes``        the page, its data endpoint, the target-curve and control routes,
                    alert thresholds and health;
- ``history``       per-publish samples of the service's counters, rates, error ratio,
                    orders over time, sold-out moments;
- ``target``        the running scenario's target curve and how orders compare with it;
- ``operator_log``  every control pressed: Redis at once, PostgreSQL through an outbox;
- ``static/``       the page itself (plain HTML, CSS and JavaScript; no build step).
"""
