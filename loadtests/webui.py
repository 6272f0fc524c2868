"""Locust's web UI under open-model arrivals: what its fields mean here, and the live arrivals.

Locust's start form disables the user count and ramp-up fields (0, "Disabled for tests using
LoadTestShape class") and ignores the run time when the locustfile has a shape class
(``ArrivalShape``): the load is the shape's arrival rate, not a number of users. What stays
visible but means something else is explained in an "Open model" tab, next to the live
figures that do matter (arrivals the shape asks for vs sent, dropped, orders/s, p99
corrected for coordinated omission):

- **Users** in the header is one arrival driver per Locust process, not the load;
- **RPS** counts requests, several per visit; arrivals per second are below;
- the kit's own options (``--peak-rps``, ``--shape`` …) are under "Custom parameters".
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadtests.plugin import Conductor

__all__ = ["TAB_KEY", "extend", "open_model_rows"]

TAB_KEY = "open-model"

EXPLAINED = (
    (
        "Users (header)",
        "one arrival driver per Locust process: not the load. The load is the shape's arrival rate",
    ),
    ("RPS (header)", "requests per second; a visit makes several. Arrivals per second: the rows above"),
    (
        "Start form",
        "number of users and ramp up are disabled (0): the shape sets the load. Change it with "
        "--peak-rps, --shape, --duration under Custom parameters",
    ),
    ("Options", "the kit's (--peak-rps, --shape, --slo …) are under Custom parameters"),
)


def open_model_rows(conductor: Conductor) -> list[dict[str, str]]:
    """The tab's rows: the live figures of the current run (if one is going), then what the
    header's fields mean here."""
    rows: list[dict[str, str]] = []
    if conductor.collector is not None and conductor.shape is not None and not conductor.failed:
        p = conductor.progress()
        live = (
            ("Phase", f"{p['phase']} (T0{p['t_from_t0_s']:+.0f} s)"),
            ("Arrivals/s: shape asks", f"{p['target_per_s']:g}"),
            ("Arrivals/s: sent", str(p["sent_per_s"])),
            ("Arrivals/s: dropped (no free slot)", str(p["dropped_per_s"])),
            ("Orders acknowledged/s", str(p["orders_per_s"])),
            (
                "p99 ms, corrected for coordinated omission",
                "-" if p["p99_corrected_ms"] is None else f"{p['p99_corrected_ms']:.0f}",
            ),
        )
        rows += [{"what": k, "value": v} for k, v in live]
        if p["hot_sku"]:
            rows.append({"what": f"{p['hot_sku']} left", "value": str(p["hot_available"])})
        if conductor.report_dir is not None:
            rows.append({"what": "Report folder", "value": str(conductor.report_dir)})
    rows += [{"what": k, "value": v} for k, v in EXPLAINED]
    return rows


def extend(web_ui: Any, conductor: Conductor) -> None:
    """Add the "Open model" tab to Locust's web UI (Locust's extended-tab mechanism)."""
    from flask import request

    web_ui.template_args["extended_tabs"] = [{"title": "Open model", "key": TAB_KEY}]
    web_ui.template_args["extended_tables"] = [
        {"key": TAB_KEY, "structure": [{"key": "what", "title": "What"}, {"key": "value", "title": "Here"}]}
    ]

    @web_ui.app.after_request  # type: ignore[untyped-decorator]
    def _open_model_stats(response: Any) -> Any:
        if request.path != "/stats/requests" or not response.is_json:
            return response
        body = response.get_json()
        body["extended_stats"] = [
            *body.get("extended_stats", []),
            {"key": TAB_KEY, "data": open_model_rows(conductor)},
        ]
        response.set_data(json.dumps(body))
        return response
