"""The war room's memory of the last minutes: one sample of every service process's published
counters per publish (taken when someone asks for the page's data, whichever process
answers), the rates and error ratio computed from them, orders created every few seconds
for the target chart, and when each SKU sold out.

Nothing here runs in the background: history exists from the moment the first viewer
opened the page or a rehearsal registered its target.

Redis keys (``flashsale.keys.ServiceKeys.warroom``: one hash tag, so a sample and its
progress point are written in one transaction, also on a Redis Cluster):

``{<prefix>:warroom}:history``         list    one JSON sample per stats publish, newest first
``{<prefix>:warroom}:progress``        list    ``<t_ms>:<orders created>`` every 5 s, oldest first
``{<prefix>:warroom}:sampled:<t_ms>``  string  claim on one publish (SET NX, expires in a minute)
``{<prefix>:warroom}:stockouts``       hash    ``<sale>/<sku>`` -> JSON ``{"in", "at_ms", "exact",
                                               "first_ms"}``: in stock, or when seen sold out
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from flashsale.keys import ServiceKeys
from flashsale.service.metrics import OUTCOMES, sum_published
from flashsale.service.state import ServiceState

__all__ = [
    "ERROR_OUTCOMES",
    "HISTORY_GAP_MS",
    "HISTORY_WINDOW_MS",
    "OUTCOME_GROUPS",
    "PROGRESS_EVERY_MS",
    "PROGRESS_MAX",
    "breaks",
    "error_ratio",
    "history_json",
    "progress_points",
    "published",
    "rate_series",
    "recent",
    "sample",
    "stockouts",
]

#: How the page groups the service's order outcomes (metrics.OUTCOMES) into chart lines.
OUTCOME_GROUPS: dict[str, tuple[str, ...]] = {
    "created": ("created",),
    "sold_out": ("sold_out",),
    "limited": ("limit_exceeded", "rate_limited"),
    "shed": ("shed",),
    "unknown": ("unknown",),
    "other": ("replayed", "not_open", "invalid", "fenced", "no_ticket"),
}
#: Answers that mean the service failed the buyer (not a refusal it meant to give).
ERROR_OUTCOMES = ("shed", "unknown", "fenced")

HISTORY_MAX = 3600  # samples kept in Redis (one per stats publish: an hour for one process)
HISTORY_WINDOW_MS = 300_000  # what the page gets: the last five minutes
PROGRESS_EVERY_MS = 5_000  # orders created, kept coarser and longer for the target chart
PROGRESS_MAX = 1440  # two hours of it
RATE_WINDOW_MS = 2_000  # orders/s over at least this long, so one late publish does not spike
#: Samples further apart than this have a hole between them: a publish lives five seconds
#: (``metrics.publish_forever``), so nobody watched then or no process published. Charts
#: break their lines there and no rate is computed across it.
HISTORY_GAP_MS = 5_000
ERROR_WINDOW_MS = 10_000  # the error ratio's window


def _keys(prefix: str) -> dict[str, str]:
    key = ServiceKeys(prefix).warroom
    return {name: key(name) for name in ("history", "progress", "sampled", "stockouts")}


async def published(state: ServiceState) -> dict[str, Any] | None:
    """Every process's last published counters, each read with its own publish time so the
    counts and their time agree (collect_stats reads them too, but a sample needs the
    publish time: the rate is counts over the time between publishes, not between page
    polls)."""
    total = await sum_published(state.redis, state.settings.key_prefix)
    if not total.processes:
        return None
    return {"t": int(total.at * 1000), "o": total.counts, "p50": total.p50_ms, "p99": total.p99_ms}


async def sample(state: ServiceState, stats: dict[str, Any]) -> None:
    """Add a sample when a process published since the newest one. Viewers and processes
    poll concurrently: a publish is claimed with SET NX first, so only one of them
    records it (reading the newest sample and then pushing would race)."""
    taken = await published(state)
    if taken is None:
        return
    keys = _keys(state.settings.key_prefix)
    key = keys["history"]
    async with state.redis.pipeline(transaction=False) as pipe:
        pipe.lindex(key, 0)
        pipe.lindex(keys["progress"], -1)
        newest, last_progress = await pipe.execute()
    if newest is not None and json.loads(newest)["t"] >= taken["t"]:
        return
    if not await state.redis.set(f"{keys['sampled']}:{taken['t']}", 1, nx=True, px=60_000):
        return
    sales = stats["sales"].values()
    taken.update(
        bl=sum(int(s["backlog"]) for s in sales),
        dl=sum(int(s["dead_letters"]) for s in sales),
        hp=sum(int(s["holds_pending"]) for s in sales),
        wr=int(float(stats["writer"].get("entries_total", 0) or 0)),
    )
    progress_due = (
        last_progress is None or int(last_progress.split(b":")[0]) + PROGRESS_EVERY_MS <= taken["t"]
    )
    async with state.redis.pipeline(transaction=True) as pipe:
        pipe.lpush(key, json.dumps(taken, separators=(",", ":")))
        pipe.ltrim(key, 0, HISTORY_MAX - 1)
        if progress_due:
            pipe.rpush(keys["progress"], f"{taken['t']}:{taken['o']['created']}")
            pipe.ltrim(keys["progress"], -PROGRESS_MAX, -1)
        await pipe.execute()


async def recent(state: ServiceState, since_ms: int, processes: int) -> list[dict[str, Any]]:
    """Samples newer than ``since_ms``, oldest first, strictly increasing in time. Reads
    only about as many as the window can hold (one per process per second)."""
    wanted = min(HISTORY_MAX, max(1, processes) * (HISTORY_WINDOW_MS // 1000 + 10))
    raw = await state.redis.lrange(_keys(state.settings.key_prefix)["history"], 0, wanted - 1)
    out: list[dict[str, Any]] = []
    for item in reversed(raw):
        sample = json.loads(item)
        if sample["t"] < since_ms or (out and sample["t"] <= out[-1]["t"]):
            continue
        out.append(sample)
    return out


def _group_total(sample: dict[str, Any], outcomes: Sequence[str]) -> int:
    return sum(int(sample["o"].get(o, 0)) for o in outcomes)


def breaks(times: Sequence[int], gap_ms: int = HISTORY_GAP_MS) -> list[int]:
    """Indices ``i`` where a new stretch begins: ``times[i]`` more than ``gap_ms`` after
    ``times[i - 1]`` (what happened in between was not seen: no line is drawn across it)."""
    return [i for i in range(1, len(times)) if times[i] - times[i - 1] > gap_ms]


def _window_start(samples: Sequence[dict[str, Any]], i: int, window_ms: int) -> int | None:
    """Index of the newest sample at least ``window_ms`` older than sample ``i``, within
    sample ``i``'s stretch (None when a gap comes first: a rate across it is an average
    over time nobody saw, not a rate)."""
    t = samples[i]["t"] - window_ms
    for j in range(i - 1, -1, -1):
        if samples[j + 1]["t"] - samples[j]["t"] > HISTORY_GAP_MS:
            return None
        if samples[j]["t"] <= t:
            return j
    return None


def rate_series(
    samples: Sequence[dict[str, Any]],
    value: Callable[[dict[str, Any]], float],
    window_ms: int = RATE_WINDOW_MS,
) -> list[float | None]:
    """Per-second rate of a cumulative counter at each sample, over at least ``window_ms``
    (None until there is that much history). A counter that went down (a process
    restarted and its count began again) counts as no change, never as a negative rate."""
    out: list[float | None] = []
    for i in range(len(samples)):
        j = _window_start(samples, i, window_ms)
        if j is None:
            out.append(None)
            continue
        dt = (samples[i]["t"] - samples[j]["t"]) / 1000
        out.append(round(max(0.0, value(samples[i]) - value(samples[j])) / dt, 3))
    return out


def error_ratio(samples: Sequence[dict[str, Any]], window_ms: int = ERROR_WINDOW_MS) -> float:
    """Share of order answers in the last ``window_ms`` that were errors (shed, unknown,
    fenced): 0.0 with no answers. Uses the oldest sample of the last stretch (since the
    last gap) when that is shorter."""
    if len(samples) < 2:
        return 0.0
    last = len(samples) - 1
    first = _window_start(samples, last, window_ms)
    if first is None:
        first = ([0] + breaks([s["t"] for s in samples]))[-1]
    answers = _group_total(samples[last], OUTCOMES) - _group_total(samples[first], OUTCOMES)
    errors = _group_total(samples[last], ERROR_OUTCOMES) - _group_total(samples[first], ERROR_OUTCOMES)
    if answers <= 0:
        return 0.0
    return round(max(0, errors) / answers, 4)


def history_json(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "window_ms": HISTORY_WINDOW_MS,
        "t_ms": [s["t"] for s in samples],
        "gap_ms": HISTORY_GAP_MS,
        "breaks": breaks([s["t"] for s in samples]),
        "rates": {
            group: rate_series(samples, lambda s, g=outcomes: _group_total(s, g))  # type: ignore[misc]
            for group, outcomes in OUTCOME_GROUPS.items()
        },
        "created_total": [int(s["o"].get("created", 0)) for s in samples],
        "p50_ms": [s["p50"] for s in samples],
        "p99_ms": [s["p99"] for s in samples],
        "backlog": [s.get("bl", 0) for s in samples],
        "writer_rate": rate_series(samples, lambda s: float(s.get("wr", 0)), window_ms=5_000),
    }


async def stockouts(state: ServiceState, sales: dict[str, Any], now: int) -> dict[str, dict[str, Any]]:
    """When each SKU sold out: ``at_ms`` the latest time (None while it is in stock again
    after a restock, a reserve release or lapsed holds), ``first_ms`` the first time.
    Exact to the page's refresh when the SKU was seen in stock before (``exact``); only
    "by then" when it was already sold out when first watched."""
    key = _keys(state.settings.key_prefix)["stockouts"]
    known = {k.decode(): json.loads(v) for k, v in (await state.redis.hgetall(key)).items()}
    changes: dict[str, str] = {}
    out: dict[str, dict[str, Any]] = {}
    for sale, info in sales.items():
        for sku, snap in info["skus"].items():
            field = f"{sale}/{sku}"
            seen = known.get(field)
            if snap["available"] > 0:
                moment = {
                    "in": True,
                    "at_ms": None,
                    "exact": None,
                    "first_ms": seen["first_ms"] if seen else None,
                }
            elif seen is None or seen["in"]:
                first = seen["first_ms"] if seen and seen["first_ms"] else now
                moment = {"in": False, "at_ms": now, "exact": seen is not None, "first_ms": first}
            else:
                moment = seen
            if moment != seen:
                changes[field] = json.dumps(moment)
            out[field] = moment
    if changes:
        await state.redis.hset(key, mapping=changes)
    return out


async def progress_points(state: ServiceState) -> list[tuple[int, int]]:
    """(t_ms, orders created) every PROGRESS_EVERY_MS while the page was watched, oldest first."""
    raw = await state.redis.lrange(_keys(state.settings.key_prefix)["progress"], 0, PROGRESS_MAX - 1)
    out = []
    for item in raw:
        t, created = (int(x) for x in item.split(b":"))
        out.append((t, created))
    return out
