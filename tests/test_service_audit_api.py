"""POST /api/admin/audit: after the order writer drained the streams, the service's own
audit compares Redis with PostgreSQL — clean after real orders, paid and cancelled; an
order a client was told about that exists nowhere is reported lost; without a database
it says what to configure."""

from __future__ import annotations

from typing import Any

import pytest
from service_support import (
    ADMIN,
    ServiceFactory,
    buyer,
    expect_json,
    new_id,
    start_service,  # noqa: F401  (fixture)
)


async def test_audit_after_the_writer_drained_is_clean_and_catches_a_lost_order(
    start_service: ServiceFactory, pipeline_db_url: str, pipeline_pool: Any, writer_running: Any
) -> None:
    service = await start_service(database_url=pipeline_db_url)
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 10, "reserve": 2, "limit_per_user": 3}]))["sale"]
    acknowledged = []
    for user in ("alice", "bob", "carol"):
        acknowledged.append((await expect_json(await service.order(user, sku, 2), 201))["order_id"])
    await expect_json(
        await service.client.post(f"/api/orders/{acknowledged[0]}/pay", headers=buyer("alice")), 200
    )
    await expect_json(
        await service.client.post(f"/api/orders/{acknowledged[1]}/cancel", headers=buyer("bob")), 200
    )
    await expect_json(await service.order("dave", sku, 9), 409, "sold_out")

    async with writer_running():
        report = await expect_json(
            await service.client.post(
                "/api/admin/audit", json={"acknowledged": acknowledged, "wait_s": 20}, headers=ADMIN
            ),
            200,
        )
        assert report["ok"] is True, report["violations"]
        assert report["sales"] == [sale] and report["drain"]["drained"] is True
        row = next(s for s in report["skus"] if s["sku"] == sku)
        assert (row["total"], row["available"], row["held"], row["sold"], row["reserve"]) == (10, 4, 2, 2, 2)
        assert (row["oversold"], row["leaked"]) == (0, 0)

        made_up = f"{sale}.neverexisted"
        report = await expect_json(
            await service.client.post(
                "/api/admin/audit",
                json={"acknowledged": [*acknowledged, made_up], "wait_s": 20},
                headers=ADMIN,
            ),
            200,
        )
    assert report["ok"] is False
    # Missing from Redis and from PostgreSQL: reported for each place, and nothing else.
    assert {v["order_id"] for v in report["violations"]} == {made_up}, report["violations"]
    assert {v["kind"] for v in report["violations"]} == {"lost"}
    assert {v["where"] for v in report["violations"]} == {"redis", "postgresql"}


async def test_audit_without_a_database_says_what_to_set(start_service: ServiceFactory) -> None:
    service = await start_service()
    body = await expect_json(await service.client.post("/api/admin/audit", headers=ADMIN), 409, "no_database")
    assert "FLASHSALE_DATABASE_URL" in body["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"acknowledged": "d11.x"},
        {"acknowledged": [1]},
        {"acknowledged": ["d11.a\u0000b"]},  # PostgreSQL cannot compare it: was a 500
        {"acknowledged": ["d11." + "x" * 200]},
        {"wait_s": -1},
        {"wait_s": 601},
        {"wait_s": "10"},
        ["d11.x"],
    ],
)
async def test_bad_audit_requests_are_422(
    start_service: ServiceFactory, pipeline_db_url: str, body: Any
) -> None:
    service = await start_service(database_url=pipeline_db_url)
    await expect_json(await service.client.post("/api/admin/audit", json=body, headers=ADMIN), 422)
