"""The war room's HTTP side: the admin token guards every route (the page takes it as
?token=), the data endpoint's shape is stable and its numbers follow what happens
(orders, sold-out moments, target, alerts), and every control pressed is logged in Redis
and PostgreSQL — refused presses too, and entries wait in Redis until PostgreSQL can
take them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from service_support import ADMIN, ADMIN_TOKEN, buyer, expect_json
from warroom_support import WarRoom, WarRoomFactory, start_warroom  # noqa: F401  (fixture)

from flashsale.pipeline.migrate import migrate_url
from flashsale.service.sales import now_ms
from flashsale.service.warroom import history, operator_log
from flashsale.service.warroom import routes as warroom

WRONG = {"Authorization": "Bearer not-the-admin-token"}

#: What the data endpoint adds to /api/admin/stats (which it repeats whole).
ADDED_TOP = {
    "now_ms",
    "switches",
    "history",
    "rates_now",
    "error_ratio",
    "target",
    "progress",
    "current_sale",
    "thresholds",
    "alerts",
    "health",
    "log",
    "lapsing_window_ms",
}
ADDED_SALE = {"phase", "countdown_ms", "holds_lapsing", "holds_overdue"}
ADDED_SKU = {"sold_out_at_ms", "sold_out_exact", "first_sold_out_at_ms"}
HISTORY_KEYS = {
    "window_ms",
    "t_ms",
    "gap_ms",
    "breaks",
    "rates",
    "created_total",
    "p50_ms",
    "p99_ms",
    "backlog",
    "writer_rate",
}
ALERTS = {"backlog", "p99_ms", "error_ratio", "dead_letters", "writer_stalled_s"}
#: A sale behind its waiting room also gets ``waiting_room`` with these.
ROOM_KEYS = {
    "on",
    "waiting",
    "pre_queue",
    "tickets_out",
    "joined",
    "admitted",
    "used",
    "expired",
    "told_sold_out",
    "told_max_ms",
    "wait_p50_ms",
    "wait_p99_ms",
    "told_p99_ms",
}
LOG_KEYS = {"entries", "unwritten", "refused", "postgres", "postgres_error"}
ENTRY_KEYS = {
    "id",
    "at_ms",
    "operator",
    "action",
    "sale",
    "sku",
    "params",
    "status",
    "outcome",
    "result",
    "note",
    "remote",
    "user_agent",
}


@pytest.fixture
async def warroom_db(pipeline_db_url: str) -> str:
    """A fresh PostgreSQL schema with every migration applied (ours included)."""
    await migrate_url(pipeline_db_url)
    return pipeline_db_url


@pytest.fixture
async def room(start_warroom: WarRoomFactory, warroom_db: str) -> WarRoom:
    return await start_warroom(database_url=warroom_db)


async def pg_log(database_url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM operator_log ORDER BY written_at, entry_id")
    finally:
        await conn.close()
    return [dict(r) for r in rows]


def control_path(sale: str, action: str, sku: str | None = None) -> str:
    if sku is None:
        return f"/api/admin/warroom/sales/{sale}/{action}"
    return f"/api/admin/warroom/sales/{sale}/skus/{sku}/{action}"


# ----------------------------------------------------------------- the admin token


async def test_every_data_and_control_route_needs_the_admin_token(room: WarRoom, warroom_db: str) -> None:
    sale = await room.create_sale([{"sku": "tok-a", "stock": 5, "reserve": 2}])
    calls = [
        ("GET", "/api/admin/warroom", None),
        ("GET", "/api/admin/warroom/log", None),
        ("GET", "/api/admin/warroom/target", None),
        ("PUT", "/api/admin/warroom/target", {"scenario": "s", "points": [[0, 0], [1000, 10]]}),
        ("DELETE", "/api/admin/warroom/target", None),
        ("POST", control_path(sale, "open"), None),
        ("POST", control_path(sale, "close"), None),
        ("POST", control_path(sale, "restock", "tok-a"), {"units": 5}),
        ("POST", control_path(sale, "release-reserve", "tok-a"), None),
        ("POST", "/api/admin/warroom/switches", {"browse": False}),
    ]
    # Every route the module defines is in the list: a new one cannot slip by unguarded.
    defined = {(r.method, r.path) for r in warroom.routes if r.path.startswith("/api/")}  # type: ignore[attr-defined]
    listed = {(m, p.replace(sale, "{sale}").replace("tok-a", "{sku}")) for m, p, _ in calls}
    assert defined == listed
    before = await expect_json(await room.http.get(f"/api/admin/sales/{sale}", headers=ADMIN), 200)
    for headers in ({}, WRONG):
        for method, path, body in calls:
            resp = await room.http.request(method, path, json=body, headers=headers)
            await expect_json(resp, 401, "unauthorized")
    after = await expect_json(await room.http.get(f"/api/admin/sales/{sale}", headers=ADMIN), 200)
    assert after == before, "a refused control changed the sale"
    assert (await expect_json(await room.http.get("/api/admin/switches", headers=ADMIN), 200))[
        "browse"
    ] is True
    assert (await room.data())["log"]["entries"] == []
    assert await pg_log(warroom_db) == []


async def test_page_asks_for_the_token_and_serves_the_dashboard_with_it(room: WarRoom) -> None:
    resp = await room.http.get("/warroom")
    assert resp.status == 401 and resp.content_type == "text/html"
    form = await resp.text()
    assert 'name="token"' in form and 'data-rejected=""' in form and 'id="skus"' not in form

    resp = await room.http.get("/warroom?token=wrong")
    assert resp.status == 401
    assert 'data-rejected="1"' in await resp.text()

    for resp in (
        await room.http.get(f"/warroom?token={quote(ADMIN_TOKEN)}"),
        await room.http.get("/warroom", headers=ADMIN),
    ):
        assert resp.status == 200 and resp.content_type == "text/html"
        page = await resp.text()
        assert 'id="skus"' in page and "/warroom/warroom.js" in page
        # The token rides in the address once: no caching, no referrer, never framed.
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]

    js = await room.http.get("/warroom/warroom.js")
    assert js.status == 200 and js.content_type == "application/javascript"
    assert "sessionStorage" in await js.text()
    css = await room.http.get("/warroom/warroom.css")
    assert css.status == 200 and css.content_type == "text/css"
    await expect_json(await room.http.get("/warroom/app.py"), 404, "not_found")
    await expect_json(await room.http.get("/warroom/..%2Fapp.py"), 404)


def test_the_printed_link_carries_the_token_url_encoded() -> None:
    assert warroom.warroom_url("http://h:8080/", "a b/c") == "http://h:8080/warroom?token=a%20b%2Fc"
    assert warroom.warroom_url("http://h", "t", sale="d11") == "http://h/warroom?token=t&sale=d11"


def test_openapi_describes_every_warroom_route() -> None:
    paths = warroom.openapi_paths()
    for route in warroom.routes:
        method = route.method.lower()  # type: ignore[attr-defined]
        assert method in paths[route.path], route.path  # type: ignore[attr-defined]
    assert len(paths) == len({r.path for r in warroom.routes})  # type: ignore[attr-defined]


# ----------------------------------------------------------------- shape and numbers


async def test_data_endpoint_shape_is_stats_plus_a_stable_set_of_fields(room: WarRoom) -> None:
    sale = await room.create_sale([{"sku": "shape-a", "stock": 10, "reserve": 3, "low_stock_line": 2}])
    assert await room.order("alice", "shape-a") == 201
    data = await room.data_until(lambda d: d["orders"]["created"] == 1 and len(d["history"]["t_ms"]) >= 1)
    stats = await expect_json(await room.http.get("/api/admin/stats", headers=ADMIN), 200)

    assert set(data) == set(stats) | ADDED_TOP
    assert set(data["sales"][sale]) == set(stats["sales"][sale]) | ADDED_SALE
    assert (
        set(data["sales"][sale]["skus"]["shape-a"])
        == set(stats["sales"][sale]["skus"]["shape-a"]) | ADDED_SKU
    )
    assert set(data["history"]) == HISTORY_KEYS
    assert set(data["history"]["rates"]) == set(history.OUTCOME_GROUPS) == set(data["rates_now"])
    n = len(data["history"]["t_ms"])
    for name in ("created_total", "p50_ms", "p99_ms", "backlog", "writer_rate"):
        assert len(data["history"][name]) == n, name
    for series in data["history"]["rates"].values():
        assert len(series) == n
    assert set(data["alerts"]) == ALERTS
    for alert in data["alerts"].values():
        assert set(alert) == {"value", "limit", "firing"}
    assert set(data["thresholds"]) == {"backlog", "p99_ms", "error_ratio", "writer_stall_s"}
    assert set(data["health"]) == {"status", "reasons"} and data["health"]["status"] in ("healthy", "alert")
    assert set(data["log"]) == LOG_KEYS
    assert data["switches"] == {"browse": True, "order_lookup": True}
    assert data["sales"][sale]["phase"] == "open"
    assert data["target"] is None
    assert set(data["progress"]) == {"origin_ms", "baseline", "points", "breaks"}
    assert data["current_sale"] == sale
    json.dumps(data, allow_nan=False)  # strict JSON: a browser's JSON.parse takes it


async def test_a_sale_behind_its_waiting_room_shows_the_room(room: WarRoom) -> None:
    """Only a sale behind its room gets the room's figures: its queue, admissions and waits
    (percentiles as bucket bounds) and the buyers told "sold out"."""
    plain = await room.create_sale([{"sku": "wr-plain", "stock": 5}])
    sale = await room.create_sale([{"sku": "wr-room", "stock": 1}], waiting_room={"rate_per_s": 1000})
    for user in ("ann", "bob", "cy"):
        resp = await room.http.post(
            f"/api/sales/{sale}/room", json={"skus": ["wr-room"]}, headers=buyer(user)
        )
        await expect_json(resp, 200)
    data = await room.data()
    assert "waiting_room" not in data["sales"][plain]
    view = data["sales"][sale]["waiting_room"]
    assert set(view) == ROOM_KEYS
    assert (view["on"], view["waiting"], view["admitted"], view["tickets_out"], view["joined"]) == (
        True,
        2,
        1,
        1,
        3,
    )
    assert view["wait_p50_ms"] is not None and view["told_sold_out"] == 0
    json.dumps(data, allow_nan=False)


async def test_numbers_follow_the_orders(room: WarRoom) -> None:
    await room.create_sale([{"sku": "num-a", "stock": 100}])
    await room.data()  # the first viewer: history starts here
    for i in range(12):
        assert await room.order(f"buyer{i}", "num-a") == 201
        await asyncio.sleep(0.1)
    await room.data_until(lambda d: d["history"]["created_total"][-1:] == [12], timeout=10)
    # The created rate covers at least two seconds of publishes: wait for one that spans them.
    data = await room.data_until(lambda d: any(v for v in d["history"]["rates"]["created"]), timeout=10)
    assert data["orders"]["created"] == 12
    sale = next(iter(data["sales"].values()))
    assert sale["skus"]["num-a"]["held"] == 12 and sale["holds_pending"] == 12
    assert sale["holds_lapsing"] == 0  # default hold TTL is 30 min
    assert data["alerts"]["backlog"]["value"] == sale["backlog"] >= 12  # no writer is running
    assert (
        max(v for v in data["history"]["rates"]["created"] if v is not None) <= 12 / 2 + 0.001
    )  # over ≥ 2 s
    assert data["progress"]["points"][-1][1] == 12


async def test_history_keeps_one_sample_per_publish_whatever_the_viewers(
    room: WarRoom, redis_client: Any
) -> None:
    await room.create_sale([{"sku": "hist-a", "stock": 5}])
    await room.data_until(lambda d: len(d["history"]["t_ms"]) >= 1)
    started = time.monotonic()
    for _ in range(3):
        await asyncio.gather(*(room.data() for _ in range(10)))  # ten viewers at once
        await asyncio.sleep(0.8)
    data = await room.data()
    elapsed = time.monotonic() - started
    times = data["history"]["t_ms"]
    assert times == sorted(set(times)), "samples must be unique and in order"
    # One process publishes once a second: never more samples stored than publishes.
    stored = await redis_client.llen("{fs:warroom}:history")
    assert len(times) == stored <= elapsed + 2, (stored, elapsed)


async def test_holds_lapsing_counts_deadlines_within_a_minute(room: WarRoom) -> None:
    short = await room.create_sale([{"sku": "lapse-a", "stock": 5}], hold_ttl_s=30)
    await room.create_sale([{"sku": "lapse-b", "stock": 5}], hold_ttl_s=600)
    assert await room.order("u1", "lapse-a") == 201
    assert await room.order("u2", "lapse-b") == 201
    data = await room.data()
    lapsing = {name: s["holds_lapsing"] for name, s in data["sales"].items()}
    assert lapsing == {short: 1, next(n for n in lapsing if n != short): 0}


async def test_sold_out_moments_latest_and_first(room: WarRoom) -> None:
    sale = await room.create_sale([{"sku": "so-a", "stock": 2}, {"sku": "so-b", "stock": 0}])
    first = await room.data()
    assert first["sales"][sale]["skus"]["so-a"]["sold_out_at_ms"] is None
    assert first["sales"][sale]["skus"]["so-a"]["first_sold_out_at_ms"] is None
    # so-b never had stock while watched: its moment is only "by then".
    assert first["sales"][sale]["skus"]["so-b"]["sold_out_exact"] is False
    assert await room.order("u1", "so-a", 2) == 201
    before = now_ms()
    data = await room.data()
    after = now_ms()
    sku = data["sales"][sale]["skus"]["so-a"]
    assert sku["state"] == "sold_out" and sku["sold_out_exact"] is True
    assert before <= sku["sold_out_at_ms"] <= after
    assert sku["first_sold_out_at_ms"] == sku["sold_out_at_ms"]
    # The moment stays put on later polls.
    again = await room.data()
    assert again["sales"][sale]["skus"]["so-a"]["sold_out_at_ms"] == sku["sold_out_at_ms"]
    # Stock comes back: no longer sold out, but the first moment is remembered ...
    await expect_json(
        await room.http.post(control_path(sale, "restock", "so-a"), json={"units": 1}, headers=ADMIN), 200
    )
    back = (await room.data())["sales"][sale]["skus"]["so-a"]
    assert back["sold_out_at_ms"] is None and back["first_sold_out_at_ms"] == sku["sold_out_at_ms"]
    # ... and selling out again records a new latest moment beside it.
    await asyncio.sleep(0.01)
    assert await room.order("u2", "so-a", 1) == 201
    twice = (await room.data())["sales"][sale]["skus"]["so-a"]
    assert twice["sold_out_at_ms"] > sku["sold_out_at_ms"] and twice["sold_out_exact"] is True
    assert twice["first_sold_out_at_ms"] == sku["sold_out_at_ms"]


# ----------------------------------------------------------------- which sale the page opens on


async def test_the_page_opens_on_the_most_recent_sale(room: WarRoom) -> None:
    now = now_ms()
    old = await room.create_sale([{"sku": "cur-old", "stock": 5}], opens_at=now - 526 * 3_600_000)
    recent = await room.create_sale([{"sku": "cur-new", "stock": 5}], opens_at=now - 60_000)
    ended = await room.create_sale([{"sku": "cur-end", "stock": 5}], opens_at=now - 1_000)
    await expect_json(await room.http.post(f"/api/admin/sales/{ended}/close", headers=ADMIN), 200)
    data = await room.data()
    assert data["sales"][old]["phase"] == data["sales"][recent]["phase"] == "open"
    # Not the sale open for 526 hours, not the closed one: the latest T0 of those not closed,
    # and the orders-made chart counts from its T0.
    assert data["current_sale"] == recent
    assert data["progress"]["origin_ms"] == data["sales"][recent]["opens_at_ms"]
    # The next sale, still counting down to its T0, is the one an operator opens the page for.
    coming = await room.create_sale([{"sku": "cur-next", "stock": 5}], opens_at=now + 120_000)
    data = await room.data()
    assert data["current_sale"] == coming and data["sales"][coming]["phase"] == "countdown"


def test_with_every_sale_closed_the_page_opens_on_the_latest() -> None:
    def sale(state: str, t0: int) -> dict[str, Any]:
        return {"state": state, "opens_at_ms": t0}

    assert warroom.current_sale({}) is None
    assert (
        warroom.current_sale({"a": sale("closed", 5), "b": sale("closed", 9), "c": sale("closed", 1)}) == "b"
    )
    assert warroom.current_sale({"a": sale("open", 5), "b": sale("closed", 9)}) == "a"


# ----------------------------------------------------------------- target curve


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"points": [[0, 0], [10, 5]]}, "scenario"),
        ({"scenario": "s", "points": [[0, 0]]}, "points"),
        ({"scenario": "s", "points": "0,0"}, "points"),
        ({"scenario": "s", "points": [[0, 0], [0, 5]]}, "points"),  # time must go forward
        ({"scenario": "s", "points": [[0, 9], [10, 5]]}, "points"),  # cumulative never drops
        ({"scenario": "s", "points": [[0, 0], [10, -1]]}, "points"),
        ({"scenario": "s", "points": [[0, 0], [10, True]]}, "points"),
        ({"scenario": "s", "points": [[0, 0], [10, 5, 1]]}, "points"),
        ({"scenario": "s", "points": [[0, 0], [10, 5]], "origin_ms": "now"}, "origin_ms"),
        ({"scenario": "s", "points": [[0, 0], [10, 5]], "sale": 7}, "sale"),
    ],
)
async def test_target_refuses_malformed_curves(room: WarRoom, body: dict[str, Any], field: str) -> None:
    resp = await room.http.put("/api/admin/warroom/target", json=body, headers=ADMIN)
    assert (await expect_json(resp, 422, "invalid_request"))["field"] == field
    await expect_json(await room.http.get("/api/admin/warroom/target", headers=ADMIN), 404, "no_target")


async def test_the_documented_target_example_is_accepted_as_written(room: WarRoom) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "warroom.md").read_text(encoding="utf-8")
    section = doc.split("## Registering a target curve", 1)[1]
    example = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))  # type: ignore[union-attr]
    stored = await expect_json(
        await room.http.put("/api/admin/warroom/target", json=example, headers=ADMIN), 200
    )
    assert stored["points"] == example["points"] and stored["scenario"] == example["scenario"]
    assert (await room.data())["target"]["scenario"] == example["scenario"]


async def test_target_of_an_unknown_sale_is_refused(room: WarRoom) -> None:
    body = {"scenario": "s", "sale": "no-such-sale", "points": [[0, 0], [10, 5]]}
    await expect_json(
        await room.http.put("/api/admin/warroom/target", json=body, headers=ADMIN), 404, "sale_not_found"
    )


async def test_target_is_compared_with_orders_made_since_it_was_registered(room: WarRoom) -> None:
    await room.create_sale([{"sku": "tgt-a", "stock": 5000}])  # more than the curve asks: no cap
    assert await room.order("early", "tgt-a") == 201  # before the scenario: not counted
    await room.data_until(lambda d: d["orders"]["created"] == 1)
    origin = now_ms() - 30_000
    body = {
        "scenario": "midnight_surge",
        "origin_ms": origin,
        "points": [[0, 0], [60_000, 600], [120_000, 600]],
    }
    stored = await expect_json(
        await room.http.put("/api/admin/warroom/target", json=body, headers=ADMIN), 200
    )
    assert stored["baseline_created"] == 1 and stored["origin_ms"] == origin
    assert await expect_json(await room.http.get("/api/admin/warroom/target", headers=ADMIN), 200) == stored
    for i in range(3):
        assert await room.order(f"u{i}", "tgt-a") == 201
    data = await room.data_until(lambda d: d["target"]["actual_now"] == 3)
    target = data["target"]
    elapsed = data["now_ms"] - origin
    assert target["elapsed_ms"] == elapsed
    assert target["expected_now"] == pytest.approx(elapsed / 60_000 * 600, abs=0.1)  # on the line 0 → 600
    assert target["capped_by_stock"] is False and target["compared_with"] == target["expected_now"]
    assert target["ratio"] == pytest.approx(3 / target["expected_now"], abs=0.001)
    assert data["progress"]["origin_ms"] == origin and data["progress"]["baseline"] == 1
    assert data["progress"]["points"][0] == [stored["registered_at_ms"] - origin, 0]  # counting starts at 0
    assert data["progress"]["points"][-1] == [elapsed, 3]
    await expect_json(await room.http.delete("/api/admin/warroom/target", headers=ADMIN), 200)
    assert (await room.data())["target"] is None


async def test_target_is_capped_by_the_stock_a_sold_out_sale_is_on_target(room: WarRoom) -> None:
    # The curve counts demand (order requests); orders stop when the stock is gone. A sale
    # that sold out its 3 units while the curve asked for ~300 orders is on target, not at 1 %.
    sale = await room.create_sale([{"sku": "cap-a", "stock": 3}])
    body = {"scenario": "s", "sale": sale, "origin_ms": now_ms() - 30_000, "points": [[0, 0], [60_000, 600]]}
    await expect_json(await room.http.put("/api/admin/warroom/target", json=body, headers=ADMIN), 200)
    for i in range(3):
        assert await room.order(f"u{i}", "cap-a") == 201
    assert await room.order("late", "cap-a") == 409  # sold out: demand the stock could not take
    data = await room.data_until(lambda d: d["target"]["actual_now"] == 3)
    target = data["target"]
    assert target["expected_now"] > 250  # the curve, as registered
    assert (target["stock_left"], target["capped_by_stock"], target["compared_with"]) == (0, True, 3)
    assert target["ratio"] == 1.0
    # Stock coming back (a restock) lifts the cap by the units left for sale.
    await expect_json(
        await room.http.post(f"/api/admin/sales/{sale}/skus/cap-a/restock", json={"units": 7}, headers=ADMIN),
        200,
    )
    again = (await room.data())["target"]
    assert (again["stock_left"], again["compared_with"]) == (7, 10)
    assert again["ratio"] == pytest.approx(0.3)


async def test_target_of_a_sale_starts_at_its_t0(room: WarRoom) -> None:
    t0 = now_ms() + 3_600_000
    sale = await room.create_sale([{"sku": "tgt-t0", "stock": 5}], opens_at=t0)
    body = {"scenario": "s", "sale": sale, "points": [[-60_000, 0], [0, 0], [60_000, 5]]}
    stored = await expect_json(
        await room.http.put("/api/admin/warroom/target", json=body, headers=ADMIN), 200
    )
    assert stored["origin_ms"] == t0
    data = await room.data()
    assert data["target"]["expected_now"] == 0  # an hour before T0: nothing expected yet
    assert data["sales"][sale]["phase"] == "countdown"
    assert 3_590_000 < data["sales"][sale]["countdown_ms"] <= 3_600_000


# ----------------------------------------------------------------- alerts


def test_rates_come_from_publishes_and_never_go_negative() -> None:
    def sample(t: int, created: int) -> dict[str, Any]:
        return {"t": t, "o": {"created": created}}

    samples = [sample(0, 0), sample(1000, 10), sample(2000, 30), sample(3000, 60), sample(4000, 5)]
    rates = history.rate_series(samples, lambda s: s["o"]["created"], window_ms=2000)
    assert rates == [None, None, 15.0, 25.0, 0.0]  # a restarted process's count is no negative rate


def test_no_rate_is_computed_across_a_gap_in_the_history() -> None:
    # Nobody watched (or nothing published) from 3 s to 60 s: the 57 s between are not a
    # rate, and the error ratio counts only what was seen since.
    def sample(t: int, created: int, shed: int = 0) -> dict[str, Any]:
        return {"t": t, "o": {"created": created, "shed": shed}, "p50": 1.0, "p99": 2.0}

    samples = [sample(0, 0, 0), sample(1000, 10, 0), sample(2000, 20, 0), sample(3000, 30, 0)]
    samples += [sample(60_000, 600, 400), sample(61_000, 610, 400), sample(62_000, 620, 400)]
    assert history.breaks([s["t"] for s in samples]) == [4]
    rates = history.rate_series(samples, lambda s: s["o"]["created"], window_ms=2000)
    assert rates == [None, None, 10.0, 10.0, None, None, 10.0]
    # 400 sheds at some unseen moment of the gap are not "the last 10 s": only what was seen since.
    assert history.error_ratio(samples) == 0.0
    shown = history.history_json(samples)
    assert shown["breaks"] == [4] and shown["gap_ms"] == history.HISTORY_GAP_MS


async def test_the_data_marks_where_the_history_has_a_gap(room: WarRoom, redis_client: Any) -> None:
    now = now_ms()
    t0 = now - 200_000
    sale = await room.create_sale([{"sku": "gap-a", "stock": 5}], opens_at=t0)
    # What the war room recorded while watched a minute and a half ago; then nobody watched.
    seen = [now - 100_000 + k * 1000 for k in range(5)]
    for t in seen:
        sample = {"t": t, "o": {"created": 0}, "p50": 1.0, "p99": 2.0, "bl": 0, "dl": 0, "hp": 0, "wr": 0}
        await redis_client.lpush("{fs:warroom}:history", json.dumps(sample))
    await redis_client.rpush("{fs:warroom}:progress", f"{t0 + 100_000}:0", f"{t0 + 105_000}:0")
    data = await room.data_until(lambda d: len(d["history"]["t_ms"]) > len(seen))
    h = data["history"]
    assert h["t_ms"][: len(seen)] == seen
    assert h["breaks"] == [len(seen)]  # the first sample taken now starts a new stretch
    assert h["rates"]["created"][len(seen)] is None
    progress = data["progress"]
    assert progress["origin_ms"] == t0 and data["current_sale"] == sale
    assert progress["points"][:2] == [[100_000, 0], [105_000, 0]]
    assert progress["breaks"] == [2]  # the orders-made line stops where nobody watched


def test_error_ratio_counts_shed_unknown_and_fenced_over_all_answers() -> None:
    def sample(t: int, **counts: int) -> dict[str, Any]:
        return {"t": t, "o": counts}

    assert history.error_ratio([]) == 0.0
    assert history.error_ratio([sample(0, created=5), sample(1000, created=5)]) == 0.0  # no answers
    old = sample(0, created=0, sold_out=0, shed=0, unknown=0, fenced=0)
    now = sample(5000, created=80, sold_out=10, shed=5, unknown=3, fenced=2)
    assert history.error_ratio([old, now]) == pytest.approx(0.1)
    # Only the last ten seconds count.
    older = sample(0, created=0, shed=100)
    window = [older, sample(20_000, created=0, shed=100), sample(30_000, created=100, shed=100)]
    assert history.error_ratio(window) == 0.0


def test_thresholds_come_from_the_environment_and_bad_values_say_which() -> None:
    assert warroom.AlertThresholds.from_env({}) == warroom.AlertThresholds()
    t = warroom.AlertThresholds.from_env(
        {
            "FLASHSALE_WARROOM_BACKLOG": "5",
            "FLASHSALE_WARROOM_P99_MS": "80",
            "FLASHSALE_WARROOM_ERROR_RATIO": "0.05",
        }
    )
    assert (t.backlog, t.p99_ms, t.error_ratio) == (5, 80.0, 0.05)
    for var, raw in (
        ("FLASHSALE_WARROOM_P99_MS", "fast"),
        ("FLASHSALE_WARROOM_BACKLOG", "-1"),
        ("FLASHSALE_WARROOM_ERROR_RATIO", "nan"),
    ):
        with pytest.raises(ValueError, match=var):
            warroom.AlertThresholds.from_env({var: raw})


async def test_alerts_fire_above_their_thresholds(
    room: WarRoom, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sale = await room.create_sale([{"sku": "al-a", "stock": 50}])
    for i in range(3):
        assert await room.order(f"u{i}", "al-a") == 201
    monkeypatch.setenv("FLASHSALE_WARROOM_P99_MS", "10000")  # a slow shared machine must not flap this
    quiet = await room.data()
    assert quiet["health"] == {"status": "healthy", "reasons": []}
    assert not any(a["firing"] for a in quiet["alerts"].values())

    monkeypatch.setenv("FLASHSALE_WARROOM_BACKLOG", "2")
    data = await room.data()
    assert data["alerts"]["backlog"] == {
        "value": data["alerts"]["backlog"]["value"],
        "limit": 2,
        "firing": True,
    }
    assert data["health"]["status"] == "alert"
    assert any("PostgreSQL" in r for r in data["health"]["reasons"])
    monkeypatch.delenv("FLASHSALE_WARROOM_BACKLOG")

    monkeypatch.setenv("FLASHSALE_WARROOM_P99_MS", "0")
    # p99 covers the last published second: keep ordering until a publish carries some.
    deadline = time.monotonic() + 10
    while not (data := await room.data())["alerts"]["p99_ms"]["firing"]:
        assert time.monotonic() < deadline, data["alerts"]
        assert await room.order(f"u{int(time.monotonic() * 1000)}", "al-a") == 201
        await asyncio.sleep(0.2)
    assert data["alerts"]["p99_ms"]["limit"] == 0 and data["alerts"]["p99_ms"]["value"] > 0
    assert any("p99" in r for r in data["health"]["reasons"])
    monkeypatch.delenv("FLASHSALE_WARROOM_P99_MS")

    # A dead letter always needs a person.
    await redis_client.xadd("{fs:" + sale + "}:dead", {"entry": "x"})
    data = await room.data()
    assert data["alerts"]["dead_letters"] == {"value": 1, "limit": 0, "firing": True}

    monkeypatch.setenv("FLASHSALE_WARROOM_ERROR_RATIO", "lots")
    await expect_json(await room.http.get("/api/admin/warroom", headers=ADMIN), 500, "bad_configuration")


# ----------------------------------------------------------------- controls and the operator log


async def test_controls_act_like_the_admin_endpoints_and_are_logged_in_redis_and_postgres(
    room: WarRoom, warroom_db: str
) -> None:
    sale = await room.create_sale([{"sku": "ctl-a", "stock": 10, "reserve": 4}], opens_at=now_ms() + 600_000)
    who = {**ADMIN, "X-Operator": quote("Lǐ Wěi"), "X-Operator-Note": quote("plan B: sales beat the plan ✓")}

    opened = await room.http.post(control_path(sale, "open"), headers=who)
    assert (await expect_json(opened, 200))["state"] == "open"
    assert opened.headers["X-Operator-Log"].endswith("; postgres=written")
    released = await expect_json(
        await room.http.post(control_path(sale, "release-reserve", "ctl-a"), json={"units": 3}, headers=who),
        200,
    )
    assert (released["available"], released["reserve"]) == (9, 1)
    restocked = await expect_json(
        await room.http.post(control_path(sale, "restock", "ctl-a"), json={"units": 5}, headers=who), 200
    )
    assert (restocked["total"], restocked["available"]) == (15, 14)
    switched = await expect_json(
        await room.http.post("/api/admin/warroom/switches", json={"browse": False}, headers=who), 200
    )
    assert switched == {"browse": False, "order_lookup": True}
    closed = await expect_json(await room.http.post(control_path(sale, "close"), headers=who), 200)
    assert closed["state"] == "closed"

    # The actions really happened (read back through the admin API, not the answers).
    counters = (await expect_json(await room.http.get(f"/api/admin/sales/{sale}", headers=ADMIN), 200))[
        "skus"
    ]["ctl-a"]
    assert (counters["total"], counters["available"], counters["reserve"]) == (15, 14, 1)
    assert (await expect_json(await room.http.get("/api/admin/switches", headers=ADMIN), 200))[
        "browse"
    ] is False

    entries = (await expect_json(await room.http.get("/api/admin/warroom/log", headers=ADMIN), 200))[
        "entries"
    ]
    assert [e["action"] for e in entries] == [
        "close_sale",
        "switches",
        "restock",
        "release_reserve",
        "open_sale",
    ]
    for e in entries:
        assert set(e) == ENTRY_KEYS
        assert (e["operator"], e["note"], e["outcome"], e["status"]) == (
            "Lǐ Wěi",
            "plan B: sales beat the plan ✓",
            "ok",
            200,
        )
        assert e["sale"] == (None if e["action"] == "switches" else sale)
    by_action = {e["action"]: e for e in entries}
    assert (
        by_action["release_reserve"]["params"] == {"units": 3}
        and by_action["release_reserve"]["sku"] == "ctl-a"
    )
    assert by_action["switches"]["params"] == {"browse": False}
    assert by_action["restock"]["result"]["total"] == 15

    rows = await pg_log(warroom_db)
    assert [r["entry_id"] for r in rows] == [e["id"] for e in reversed(entries)]
    for row in rows:
        assert (row["operator"], row["note"], row["outcome"], row["status"]) == (
            "Lǐ Wěi",
            "plan B: sales beat the plan ✓",
            "ok",
            200,
        )
    assert json.loads(rows[1]["params"]) == {"units": 3}
    data = await room.data()
    assert data["log"]["postgres"] == "ok" and data["log"]["unwritten"] == 0
    assert [e["id"] for e in data["log"]["entries"]] == [e["id"] for e in entries]


async def test_a_refused_control_is_logged_with_its_code(room: WarRoom, warroom_db: str) -> None:
    sale = await room.create_sale([{"sku": "ref-a", "stock": 3}])
    await expect_json(
        await room.http.post(control_path(sale, "restock", "ref-a"), json={"units": 0}, headers=ADMIN),
        422,
        "invalid_request",
    )
    await expect_json(
        await room.http.post(control_path("no-such-sale", "close"), headers=ADMIN), 404, "sale_not_found"
    )
    await expect_json(
        await room.http.post("/api/admin/warroom/switches", json={"everything": False}, headers=ADMIN),
        422,
        "invalid_request",
    )
    entries = (await room.data())["log"]["entries"]
    assert [(e["action"], e["status"], e["outcome"], e["operator"]) for e in entries] == [
        ("switches", 422, "invalid_request", "anonymous"),
        ("close_sale", 404, "sale_not_found", "anonymous"),
        ("restock", 422, "invalid_request", "anonymous"),
    ]
    assert entries[2]["params"] == {"units": 0} and entries[2]["result"] is None
    assert sorted(r["outcome"] for r in await pg_log(warroom_db)) == [
        "invalid_request",
        "invalid_request",
        "sale_not_found",
    ]
    counters = (await expect_json(await room.http.get(f"/api/admin/sales/{sale}", headers=ADMIN), 200))[
        "skus"
    ]["ref-a"]
    assert counters["total"] == 3


async def test_a_press_with_a_non_json_number_keeps_the_page_readable(room: WarRoom, warroom_db: str) -> None:
    sale = await room.create_sale([{"sku": "nan-a", "stock": 3}])
    resp = await room.http.post(
        control_path(sale, "restock", "nan-a"),
        data=b'{"units": NaN}',
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    await expect_json(resp, 422)
    raw = await (await room.http.get("/api/admin/warroom", headers=ADMIN)).text()
    data = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in the page's data"))
    assert data["log"]["entries"][0]["params"] == {"unreadable": '{"units": NaN}'}
    assert [r["params"] for r in await pg_log(warroom_db)] == [json.dumps({"unreadable": '{"units": NaN}'})]


@pytest.mark.parametrize(
    ("label", "body", "headers"),
    [
        ("lists nested past the parser's depth", b"[" * 3000 + b"]" * 3000, {}),
        ("an object nested 200 deep", b'{"a":' * 200 + b"1" + b"}" * 200, {}),
        ("gzip declared on plain JSON", b'{"units": 1}', {"Content-Encoding": "gzip"}),
    ],
)
async def test_a_press_whose_body_the_log_cannot_keep_is_applied_and_logged_once(
    room: WarRoom, warroom_db: str, label: str, body: bytes, headers: dict[str, str]
) -> None:
    """Opening a sale ignores the body; the log keeps it. A body too deep to parse (or to
    store) made the press a 500 after the sale had opened, and left it out of the log."""
    sale = await room.create_sale([{"sku": "deep-a", "stock": 3}], opens_at=now_ms() + 600_000)
    resp = await room.http.post(
        control_path(sale, "open"),
        data=body,
        headers={**ADMIN, "Content-Type": "application/json", **headers},
    )
    assert (await expect_json(resp, 200))["state"] == "open", label
    entries = (await room.data())["log"]["entries"]
    assert [(e["action"], e["outcome"], e["status"]) for e in entries] == [("open_sale", "ok", 200)]
    assert set(entries[0]["params"]) == {"unreadable"}
    assert [r["action"] for r in await pg_log(warroom_db)] == ["open_sale"]


async def test_a_bad_operator_header_is_refused_before_anything_happens(
    room: WarRoom, warroom_db: str
) -> None:
    sale = await room.create_sale([{"sku": "hdr-a", "stock": 3}])
    for header in ({"X-Operator": "x" * 65}, {"X-Operator-Note": quote("a\x00b")}):
        resp = await room.http.post(control_path(sale, "close"), headers={**ADMIN, **header})
        await expect_json(resp, 422, "invalid_request")
    assert (await room.data())["sales"][sale]["state"] == "open"
    assert (await room.data())["log"]["entries"] == []
    assert await pg_log(warroom_db) == []


async def test_log_entries_wait_in_redis_until_postgres_has_the_table(
    start_warroom: WarRoomFactory, pipeline_db_url: str
) -> None:
    room = await start_warroom(database_url=pipeline_db_url)  # a schema the migrations never reached
    sale = await room.create_sale([{"sku": "wait-a", "stock": 3}])
    resp = await room.http.post(control_path(sale, "close"), headers={**ADMIN, "X-Operator": "ana"})
    await expect_json(resp, 200)
    assert resp.headers["X-Operator-Log"].endswith("; postgres=pending")
    data = await room.data()
    assert data["log"]["postgres"] == "pending" and data["log"]["unwritten"] == 1
    assert "operator_log" in data["log"]["postgres_error"]

    await migrate_url(pipeline_db_url)
    await asyncio.sleep(operator_log.FLUSH_EVERY_MS / 1000 + 0.2)  # the retry lock from the last poll lapses
    data = await room.data_until(lambda d: d["log"]["postgres"] == "ok", timeout=10)
    assert data["log"]["unwritten"] == 0 and data["log"]["postgres_error"] is None
    rows = await pg_log(pipeline_db_url)
    assert [(r["entry_id"], r["operator"], r["action"]) for r in rows] == [
        (data["log"]["entries"][0]["id"], "ana", "close_sale")
    ]


async def test_an_entry_postgres_refuses_for_good_is_set_aside_not_lost(
    room: WarRoom, warroom_db: str, redis_client: Any
) -> None:
    # An entry a newer or buggy writer left in the outbox that no row can hold (status
    # does not fit a smallint): it moves to the refused list; the entries behind it go on.
    bad = {
        "id": "0-bad",
        "at_ms": now_ms(),
        "operator": "x",
        "action": "restock",
        "sale": None,
        "sku": None,
        "params": {},
        "status": 10**6,
        "outcome": "ok",
        "result": None,
        "note": "",
        "remote": None,
        "user_agent": "",
    }
    await redis_client.rpush("{fs:warroom}:log:unwritten", json.dumps(bad, separators=(",", ":")))
    sale = await room.create_sale([{"sku": "bad-a", "stock": 3}])
    resp = await room.http.post(control_path(sale, "close"), headers=ADMIN)
    assert resp.headers["X-Operator-Log"].endswith("; postgres=written")
    assert [json.loads(e)["id"] for e in await redis_client.lrange("{fs:warroom}:log:refused", 0, -1)] == [
        "0-bad"
    ]
    assert await redis_client.llen("{fs:warroom}:log:unwritten") == 0
    assert [r["action"] for r in await pg_log(warroom_db)] == ["close_sale"]
    assert (await room.data())["log"]["refused"] == 1


async def test_without_a_database_the_log_is_kept_in_redis_and_says_so(start_warroom: WarRoomFactory) -> None:
    room = await start_warroom(database_url=None)
    sale = await room.create_sale([{"sku": "nodb-a", "stock": 3}])
    resp = await room.http.post(control_path(sale, "close"), headers=ADMIN)
    assert resp.headers["X-Operator-Log"].endswith("; postgres=no_database")
    data = await room.data()
    assert data["log"]["postgres"] == "no_database" and data["log"]["unwritten"] == 0
    assert [e["action"] for e in data["log"]["entries"]] == ["close_sale"]
    await expect_json(
        await room.http.get("/api/admin/warroom/log?limit=0", headers=ADMIN), 422, "invalid_request"
    )
    assert (
        len(
            (await expect_json(await room.http.get("/api/admin/warroom/log?limit=1", headers=ADMIN), 200))[
                "entries"
            ]
        )
        == 1
    )
