"""The war room's health goes red when orders wait and no order writer commits: the
try-out once showed HEALTHY while nothing reached PostgreSQL. With a writer draining the
streams, the same orders leave the health alone."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from warroom_support import WarRoom, WarRoomFactory, start_warroom  # noqa: F401  (fixture)

from flashsale.service.warroom import routes as warroom


def _stalled(data: dict[str, Any]) -> bool:
    return bool(data["alerts"]["writer_stalled_s"]["firing"])


async def test_orders_waiting_with_no_writer_turn_the_health_red(
    start_warroom: WarRoomFactory,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    room: WarRoom = await start_warroom()
    monkeypatch.setenv("FLASHSALE_WARROOM_P99_MS", "100000")  # only the writer's alert is under test
    sale = await room.create_sale([{"sku": "ws-a", "stock": 50}])
    quiet = await room.data()
    assert quiet["alerts"]["writer_stalled_s"]["limit"] == 60.0 and not _stalled(quiet)
    for i in range(3):
        assert await room.order(f"ws{i}", "ws-a") == 201

    # Waiting, but not yet for longer than the threshold: no alarm for a writer that is
    # merely about to commit.
    monkeypatch.setenv("FLASHSALE_WARROOM_WRITER_STALL_S", "3600")
    data = await room.data()
    assert not _stalled(data) and data["health"]["status"] == "healthy", data["health"]

    monkeypatch.setenv("FLASHSALE_WARROOM_WRITER_STALL_S", "0.5")
    data = await room.data_until(_stalled)
    alert = data["alerts"]["writer_stalled_s"]
    assert alert["limit"] == 0.5 and alert["value"] >= 0.5  # rounded: firing at the limit
    assert data["health"]["status"] == "alert"
    reason = next(r for r in data["health"]["reasons"] if "writer" in r)
    assert "wait to reach PostgreSQL" in reason and "flashsale worker" in reason, reason
    assert sale in data["sales"]


async def test_a_writer_that_commits_keeps_the_health_green(
    start_warroom: WarRoomFactory,  # noqa: F811
    writer_running: Any,
    drained: Any,
    text_redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    room: WarRoom = await start_warroom()
    monkeypatch.setenv("FLASHSALE_WARROOM_P99_MS", "100000")
    monkeypatch.setenv("FLASHSALE_WARROOM_WRITER_STALL_S", "0")  # any wait at all would fire
    sale = await room.create_sale([{"sku": "wg-a", "stock": 50}])
    async with writer_running():
        for i in range(3):
            assert await room.order(f"wg{i}", "wg-a") == 201
        await drained(text_redis, [sale])
        data = await room.data()
    assert data["alerts"]["writer_stalled_s"] == {"value": 0.0, "limit": 0.0, "firing": False}
    assert data["health"] == {"status": "healthy", "reasons": []}


def test_the_threshold_comes_from_the_environment() -> None:
    assert warroom.AlertThresholds().writer_stall_s == 60.0  # FlashsaleWriterStalled's 60 s
    assert warroom.AlertThresholds.from_env({"FLASHSALE_WARROOM_WRITER_STALL_S": "5"}).writer_stall_s == 5.0
    with pytest.raises(ValueError, match="FLASHSALE_WARROOM_WRITER_STALL_S"):
        warroom.AlertThresholds.from_env({"FLASHSALE_WARROOM_WRITER_STALL_S": "soon"})
