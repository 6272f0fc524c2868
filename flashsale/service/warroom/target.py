"""The running scenario's target curve — cumulative orders created over time, as a
rehearsal registers it — and how the orders made so far compare with it.

Redis key (``flashsale.keys.ServiceKeys.warroom``):

``{<prefix>:warroom}:target``          string  JSON target curve of the running scenario
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from flashsale.keys import ServiceKeys
from flashsale.service.errors import ApiError
from flashsale.service.state import ServiceState
from flashsale.service.warroom.history import HISTORY_GAP_MS, PROGRESS_EVERY_MS, breaks, progress_points

__all__ = ["MAX_TARGET_POINTS", "forget", "parse_points", "progress", "store", "stored", "target_json"]

MAX_TARGET_POINTS = 10_000
#: Orders-made points come every PROGRESS_EVERY_MS while someone watches; further apart, a gap.
PROGRESS_GAP_MS = PROGRESS_EVERY_MS + HISTORY_GAP_MS


def _key(state: ServiceState) -> str:
    return ServiceKeys(state.settings.key_prefix).warroom("target")


def _interpolate(points: Sequence[Sequence[float]], t: float) -> float:
    """The target at ``t`` (points go forward in time): 0 before the first point, the
    last value after the last one, a straight line in between."""
    if t < points[0][0]:
        return 0.0
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t <= t1:
            return float(v0) + (float(v1) - float(v0)) * (t - t0) / (t1 - t0)
    return float(points[-1][1])


def parse_points(value: Any) -> list[list[float]]:
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_TARGET_POINTS:
        raise ApiError(
            422,
            "invalid_request",
            f"points is a list of 2 to {MAX_TARGET_POINTS} [t_ms, cumulative_orders] pairs",
            field="points",
        )
    points: list[list[float]] = []
    for p in value:
        ok = (
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in p)
        )
        if not ok:
            raise ApiError(
                422, "invalid_request", "each point is [t_ms, cumulative_orders], two numbers", field="points"
            )
        t, v = p
        if not -86_400_000 <= t <= 30 * 86_400_000 or not 0 <= v <= 1e12:
            raise ApiError(
                422,
                "invalid_request",
                "t_ms is within a day before to 30 days after the origin; orders are 0 to 1e12",
                field="points",
            )
        if points and (t <= points[-1][0] or v < points[-1][1]):
            raise ApiError(
                422,
                "invalid_request",
                "points go forward in time and the cumulative orders never go down",
                field="points",
            )
        points.append([t, v])
    return points


def target_json(
    target: dict[str, Any] | None, created_total: int, now: int, stock_left: int
) -> dict[str, Any] | None:
    """The target against the orders made since it was registered. The curve counts demand
    (the order requests the scenario sends); orders stop when the stock is gone. So the
    ratio compares the orders made with what the curve expects *as far as the stock
    allows*: at most the orders made plus the units still left for sale (``stock_left``;
    one unit an order). A sale that sold out on time is on target (100 %), not 27 %."""
    if target is None:
        return None
    elapsed = now - target["origin_ms"]
    expected = _interpolate(target["points"], elapsed)
    actual = max(0, created_total - target["baseline_created"])
    possible = actual + max(0, stock_left)
    compared = min(expected, float(possible))
    return {
        **target,
        "elapsed_ms": elapsed,
        "expected_now": round(expected, 1),
        "actual_now": actual,
        "stock_left": max(0, stock_left),
        "capped_by_stock": possible < expected,
        "compared_with": round(compared, 1),
        "ratio": round(actual / compared, 3) if compared > 0 else None,
    }


async def progress(
    state: ServiceState,
    target: dict[str, Any] | None,
    sale: dict[str, Any] | None,
    created_now: int,
    now: int,
) -> dict[str, Any] | None:
    """Orders created since the origin — the target's, else the T0 of ``sale`` (the one the
    page opens on; None when it is closed) — as [ms since origin, orders] points for the
    chart, and the indices where a new stretch begins after a gap (nobody watched: no
    line is drawn across it). With a target, counting starts when it was registered (at
    0 orders, by definition)."""
    if target is not None:
        origin, baseline = int(target["origin_ms"]), int(target["baseline_created"])
        start = int(target["registered_at_ms"]) - origin
    elif sale is not None and sale["state"] != "closed":
        origin, baseline, start = int(sale["opens_at_ms"]), 0, 0
    else:
        return None
    points: list[list[int]] = [[start, baseline]] if target is not None else []
    for t, created in await progress_points(state):
        if t - origin <= start and target is None:
            baseline = created  # the count at T0: earlier sales' orders are not this one's
        if t - origin > start:
            points.append([t - origin, created])
    points.append([now - origin, created_now])
    return {
        "origin_ms": origin,
        "baseline": baseline,
        "points": [[t, max(0, c - baseline)] for t, c in points],
        "breaks": breaks([t for t, _c in points], PROGRESS_GAP_MS),
    }


async def stored(state: ServiceState) -> dict[str, Any] | None:
    """The registered target, or None."""
    raw = await state.redis.get(_key(state))
    return None if raw is None else dict(json.loads(raw))


async def store(state: ServiceState, target: dict[str, Any]) -> None:
    await state.redis.set(_key(state), json.dumps(target))


async def forget(state: ServiceState) -> bool:
    """Delete the target; True if there was one."""
    return bool(await state.redis.delete(_key(state)))
