"""The generator-cost baseline: the plainest Locust user there is, posting orders to the
trivial endpoint at a set rate (``benchmarks.generator_bench`` runs it).

    FLASHSALE_BENCH_PLAIN_RATE=500 locust -f benchmarks/plain_locustfile.py --headless \
        --host http://127.0.0.1:8081 -u 64 -r 64 -t 30s

``FLASHSALE_BENCH_PLAIN_RATE`` is requests per second for all users together (paced with
``constant_throughput``). When ``FLASHSALE_BENCH_COUNTS`` names a file, Locust's own count
of requests per wall-clock second is written there as JSON when Locust quits — read from
its statistics, so counting costs the user nothing extra.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from locust import FastHttpUser, constant_throughput, events, task

_RATE = float(os.environ.get("FLASHSALE_BENCH_PLAIN_RATE", "100"))
_USERS = int(os.environ.get("FLASHSALE_BENCH_PLAIN_USERS", "64"))
_ids = itertools.count()


class PlainBuyer(FastHttpUser):
    """One order after another, each with a fresh request id, nothing else."""

    wait_time = constant_throughput(_RATE / _USERS)

    @task
    def order(self) -> None:
        self.client.post("/api/orders", json={"request_id": f"p{next(_ids)}", "sku": "hot", "qty": 1})


def _write_counts(environment: Any, **_kw: Any) -> None:
    path = os.environ.get("FLASHSALE_BENCH_COUNTS")
    if path:
        per_second = environment.stats.total.num_reqs_per_sec
        with open(path, "w", encoding="utf-8") as out:
            json.dump({str(second): n for second, n in sorted(per_second.items())}, out)


events.quitting.add_listener(_write_counts)  # type: ignore[no-untyped-call]
