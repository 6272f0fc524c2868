"""A small recorded run for the report's tests: two request kinds answered by two Locust
processes over twelve seconds, with a stall and some errors — and its report written from
that record (no Locust, no service), as the kit's plugin would write it."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.recording import ProcessRecorder, RunCollector
from loadtests.report import Report, write_report
from loadtests.shapes import Shape, midnight_surge
from loadtests.slo import RunValidity

START = 1_800_000_000.0
#: The order spike: second 6 of the run answers orders in 400 ms.
SPIKE_SECOND = 6


def two_kinds() -> tuple[RunCollector, Shape, dict[str, list[float]]]:
    """Two processes, twelve seconds: ``browse`` answers in 2-3 ms, ``order`` in 20-29 ms
    (400 ms in ``SPIKE_SECOND``), and every fifth order is an unexpected 500. Returns the
    latencies (s) each kind was answered in, to check the report against."""
    shape = midnight_surge(20.0, 0.2)
    collector = RunCollector(START)
    collector.expect(["p0", "p1"])
    answered: dict[str, list[float]] = {"browse": [], "order": []}
    for k in range(2):
        rec = ProcessRecorder(f"p{k}", START)
        for s in range(12):
            for i in range(10):
                at = START + s + 0.05 + i * 0.09 + k * 0.01
                browse = 0.002 + i * 0.0001
                order = 0.4 if s == SPIKE_SECOND else 0.02 + i * 0.001
                rec.request(
                    "browse", intended=at, sent=at, done=at + browse, expected=True, label="200", bucket="ok"
                )
                rec.request(
                    "order",
                    intended=at,
                    sent=at,
                    done=at + order,
                    expected=i % 5 != 0,
                    label="201" if i % 5 else "500",
                    bucket="created" if i % 5 else "unknown",
                )
                answered["browse"].append(browse)
                answered["order"].append(order)
            rec.sample_cpu(START + s + 0.5, 40.0 + s)
        rec.done = True
        collector.absorb(json.loads(json.dumps(rec.export())))
        rec.close()
    return collector, shape, answered


#: The run's settings, as the kit's Locust plugin passes them (``plugin.run_settings``).
SETTINGS = {"peak_rps": 20.0, "shop_db": "shop.db", "admin_token": "(secret)"}


def two_kinds_report(
    folder: Path, *, plots: bool = True, bounds: RunValidity = RunValidity()
) -> tuple[Report, Path]:
    collector, shape, _ = two_kinds()
    report = write_report(
        folder,
        collector,
        shape,
        {
            "id": "f1",
            "name": "shop",
            "host": "http://test",
            "order_operations": ["order"],
            "settings": SETTINGS,
        },
        elapsed_s=12.0,
        thresholds=["latency:p(95)<1000", "latency{name:order}:avg<1000"],
        bounds=bounds,
        plots=plots,
    )
    return report, folder
