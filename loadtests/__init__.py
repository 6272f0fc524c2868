"""The surge kit: rehearse a flash-sale opening against any HTTP backend with Locust, and judge
the business outcome — nothing oversold, lost or duplicated — not only the latency.

Write a locustfile with the public API (``__all__``, docs/your-backend.md)::

    from loadtests import Rehearsal, Truth, Visit, OracleContext

    rehearsal = Rehearsal("shop", order_operations=("checkout",))

    @rehearsal.persona(weight=3)
    def buyer(visit: Visit) -> None:
        with visit.post("/checkout", name="checkout", key=visit.id, json={"item": "mug"}) as call:
            if call.status == 201:
                call.ok(order=call.body["order"], item="mug", units=1)
            elif call.status == 409:
                call.refused("out_of_stock")

    @rehearsal.oracle
    def ledger(ctx: OracleContext) -> Truth:
        ...  # read your backend's own truth: stocked, sold, recorded

    ArrivalDriver, ArrivalShape = rehearsal.locust_classes()

The pieces, one concern per module. The kit (any backend):

- ``rehearsal``  what a locustfile declares: personas, shapes, setup, sampler, oracle hooks;
- ``visits``     one visit's HTTP calls and the outcome reported for each (ok / refused / unknown);
- ``plugin``     the Locust plugin: options, the arrival driver, the shape class, the master's
                 conductor (plan, samples, oracle, report, exit code);
- ``webui``      the "Open model" tab of Locust's web UI;
- ``shapes``     arrival-rate curves ``rate(t)`` with exact integrals (midnight_surge,
                 double11_day, capacity_step, soak, or yours from a table or a function);
- ``arrivals``   the open-model arrival schedule and its dispatcher (sub-second timing,
                 a wall-clock T0 rendezvous shared by every Locust process, dropped arrivals);
- ``latency``    HdrHistogram recording, merging and log files (raw and corrected for
                 coordinated omission);
- ``recording``  what one Locust process records per second and how the pieces from all
                 processes are merged into one run;
- ``history``    the request log as a history external checkers read (``loadtests.history/1``);
- ``verdict``    the business verdict: a backend's truth against what clients were told;
- ``slo``        k6-style thresholds and run validity;
- ``exit_codes`` what a run's exit status means;
- ``report``     summary.json, the per-second timeline, HdrHistogram logs, report.html, the
                 console table;
- ``charts``     the report's charts, each as a PNG and as an interactive chart (uPlot,
                 vendored in ``static/`` and inlined: the page opens offline).

flashsale's own drill, the kit's first client:

- ``surge``      the locustfile (``locust -f "$(python -m loadtests path)" --host …``);
- ``personas``   browsers, buyers, abandoners, bots and retry-storm clients on flashsale's API;
- ``drill``      the drill's sale, sized from the shape;
- ``admin``      flashsale's operator API (tokens, sales, stats, audit);
- ``oracle``     flashsale's audit read as a ``Truth`` (``python -m loadtests.oracle``);
- ``capacity``   what a capacity_step run says about a machine.

This package talks to backends over HTTP only; it never imports the service. Names are
exported lazily: ``from loadtests import exit_codes`` does not import Locust (which patches
the standard library for gevent).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadtests.history import HISTORY_FORMAT, HistorySummary, Operation, read_history
    from loadtests.recording import ServiceSample
    from loadtests.rehearsal import (
        OracleContext,
        ProcessContext,
        Rehearsal,
        RunContext,
        SetupContext,
        SetupError,
    )
    from loadtests.shapes import (
        SHAPES,
        Impulse,
        Segment,
        Shape,
        Window,
        capacity_step,
        double11_day,
        midnight_surge,
        rate_function,
        rate_table,
        soak,
    )
    from loadtests.verdict import Check, Recorded, Truth, Verdict
    from loadtests.visits import Call, Visit

__all__ = [
    "HISTORY_FORMAT",
    "SHAPES",
    "Call",
    "Check",
    "HistorySummary",
    "Impulse",
    "Operation",
    "OracleContext",
    "ProcessContext",
    "Recorded",
    "Rehearsal",
    "RunContext",
    "Segment",
    "ServiceSample",
    "SetupContext",
    "SetupError",
    "Shape",
    "Truth",
    "Verdict",
    "Visit",
    "Window",
    "capacity_step",
    "double11_day",
    "midnight_surge",
    "rate_function",
    "rate_table",
    "read_history",
    "soak",
]

_HOME = {
    **dict.fromkeys(("HISTORY_FORMAT", "HistorySummary", "Operation", "read_history"), "history"),
    "ServiceSample": "recording",
    **dict.fromkeys(
        ("OracleContext", "ProcessContext", "Rehearsal", "RunContext", "SetupContext", "SetupError"),
        "rehearsal",
    ),
    **dict.fromkeys(
        (
            "SHAPES",
            "Impulse",
            "Segment",
            "Shape",
            "Window",
            "capacity_step",
            "double11_day",
            "midnight_surge",
            "rate_function",
            "rate_table",
            "soak",
        ),
        "shapes",
    ),
    **dict.fromkeys(("Check", "Recorded", "Truth", "Verdict"), "verdict"),
    **dict.fromkeys(("Call", "Visit"), "visits"),
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'loadtests' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"loadtests.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
