"""flashsale's drill sale: what is stocked, when it opens, and what happens to it mid-surge.

A default drill sale sized from the shape, so that every run shows the same story
whatever ``--peak-rps`` is:

- a **hot SKU** (``phone-<run id>``) with far more demand than stock (stock ≈ 5 % of the orders
  expected for it), a per-user limit of 1, and a **reserve pool** of 20 % more held back
  and released mid-surge ("sellers keep ~20 % extra back and release it when sales beat
  the plan", SURGE.md);
- a SKU that sells out late (``earbuds``, stock ≈ 60 % of its demand, limit 2), helped by
  abandoned holds lapsing and being sold again;
- a SKU that never sells out (``charger``, stock ≈ 2× demand, limit 5);
- a short hold TTL (10 s × time scale) so abandoned holds lapse within the run.

It opens at the shape's T0 on the wall clock (``opens_at`` = the rendezvous instant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loadtests.personas import DEFAULT_WEIGHTS, PERSONAS, Behaviour, Catalogue, CatalogueItem
from loadtests.shapes import Shape

__all__ = ["DrillSale", "default_sale", "sale_from_settings"]


@dataclass(frozen=True)
class DrillSale:
    """A sale as the drill uses it; ``spec`` is the ``POST /api/admin/sales`` body."""

    name: str
    catalogue: Catalogue
    spec: dict[str, Any]
    hold_ttl_s: float
    #: Seconds after the drill's start at which the hot SKU's reserve pool is released.
    release_reserve_at_s: float | None = None


def _weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    given = DEFAULT_WEIGHTS if weights is None else weights
    return {p: float(given.get(p, 0.0)) for p in PERSONAS}


def expected_orders(shape: Shape, weights: Mapping[str, float] | None, behaviour: Behaviour) -> float:
    """Roughly how many order requests a drill of ``shape`` sends (for sizing stock)."""
    w = _weights(weights)
    orders_per_visit = {
        "browser": 0.0,
        "buyer": 1.0,
        "abandoner": 1.0,
        "bot": float(behaviour.bot_burst),
        "retry_storm": 1.2,
    }
    mean_all = sum(w[p] * orders_per_visit[p] for p in w) / max(sum(w.values()), 1e-9)
    buying = {p: v for p, v in w.items() if p != "browser"}
    mean_rendezvous = (
        (sum(buying[p] * orders_per_visit[p] for p in buying) / sum(buying.values()))
        if sum(buying.values())
        else 1.0
    )
    countdown = sum(shape.expected(win.start, win.end) for win in shape.windows if win.kind == "countdown")
    rendezvous = sum(i.count for i in shape.impulses)
    rest = shape.total - countdown - rendezvous
    return rest * mean_all + rendezvous * mean_rendezvous


def default_sale(
    shape: Shape,
    run_id: str,
    *,
    weights: Mapping[str, float] | None = None,
    behaviour: Behaviour | None = None,
    start_epoch: float,
    hold_ttl_s: float | None = None,
) -> DrillSale:
    behaviour = behaviour or Behaviour()
    orders = expected_orders(shape, weights, behaviour)
    time_scale = float(shape.params.get("time_scale", 1.0))
    ttl = hold_ttl_s if hold_ttl_s is not None else 10.0 * time_scale
    w = _weights(weights)
    bot_share = (
        w["bot"]
        * behaviour.bot_burst
        / max(sum(w[p] * (behaviour.bot_burst if p == "bot" else 1) for p in w if p != "browser"), 1e-9)
    )
    # SKU ids are unique across a deployment's sales, so each drill's carry its run id.
    plan = tuple(
        (f"{base}-{run_id}", weight, limit)
        for base, weight, limit in (("phone", 0.6, 1), ("earbuds", 0.25, 2), ("charger", 0.15, 5))
    )
    phone, earbuds, charger = (p[0] for p in plan)
    items = tuple(CatalogueItem(sku, weight, limit) for sku, weight, limit in plan)
    demand = {
        sku: orders * ((1 - bot_share) * weight + (bot_share if sku == phone else 0.0))
        for sku, weight, _ in plan
    }
    hot_stock = max(10, math.ceil(0.05 * demand[phone]))
    stock = {
        phone: hot_stock,
        earbuds: max(10, math.ceil(0.6 * demand[earbuds])),
        charger: max(10, math.ceil(2 * demand[charger])),
    }
    reserve = {phone: max(2, math.ceil(0.2 * hot_stock)), earbuds: 0, charger: 0}
    name = f"d11-{run_id}"
    spec = {
        "sale": name,
        "opens_at": int(round((start_epoch + shape.t0_s) * 1000)),
        "early_access_s": 0,
        "hold_ttl_s": max(1, int(round(ttl))),
        "skus": [
            {
                "sku": sku,
                "stock": stock[sku],
                "reserve": reserve[sku],
                "limit_per_user": limit,
                "low_stock_line": max(1, stock[sku] // 10),
            }
            for sku, _, limit in plan
        ],
    }
    # Mid-surge: halfway through the opening plateau (or a third into shapes without one).
    opening = next((win for win in shape.windows if win.name == "opening"), None)
    release_at = (opening.start + opening.end) / 2 if opening else shape.duration_s / 3
    return DrillSale(name, Catalogue(items, hot=phone), spec, ttl, release_at)


def sale_from_settings(settings: dict[str, Any], hot: str | None = None) -> DrillSale:
    """Drive an existing sale (``GET /api/admin/sales/{sale}``): equal demand per SKU, the
    SKU with the least stock is the hot one unless named."""
    skus = settings.get("skus") or []
    if isinstance(skus, dict):
        skus = [{"sku": k, **v} for k, v in skus.items()]
    if not skus:
        raise ValueError(
            f"sale {settings.get('sale')!r} has no SKUs; create one with SKUs or let the drill create its own"
        )
    items = tuple(CatalogueItem(str(s["sku"]), 1.0, int(s.get("limit_per_user") or 1)) for s in skus)
    if hot is None:
        hot = min(skus, key=lambda s: int(s.get("stock", s.get("total", 0)) or 0))["sku"]
    return DrillSale(
        str(settings.get("sale")),
        Catalogue(items, hot=str(hot)),
        dict(settings),
        float(settings.get("hold_ttl_s", 1800)),
        None,
    )
