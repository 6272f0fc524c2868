"""The war room in a real browser: Debian's headless Chromium, driven by Playwright (no
browser download: Playwright only launches /usr/bin/chromium). The page loads with the
token in its address during a short surge of orders, the numbers on screen change, an
operator releases a reserve pool through the confirmation, the stock bar grows, and the
press shows up in the operator log on the page and in PostgreSQL. Screenshots are saved
as test artifacts (``$FLASHSALE_TEST_ARTIFACTS/warroom/`` or the test's tmp dir).

Without Chromium or Playwright the test is skipped locally and fails under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from service_support import ADMIN, ADMIN_TOKEN, expect_json
from warroom_support import WarRoom, WarRoomFactory, start_warroom  # noqa: F401  (fixture)

from flashsale.pipeline.migrate import migrate_url

CHROMIUM = os.environ.get("FLASHSALE_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that talks to the outside world or needs a GPU or a sandbox.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}


def _require_browser() -> None:
    missing = []
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing.append(f"Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append(
            "the playwright package (pip install 'flashsale[test]'; no `playwright install` needed)"
        )
    if not missing:
        return
    message = "the war-room browser test needs " + " and ".join(missing)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _artifacts(tmp_path: Path) -> Path:
    root = os.environ.get("FLASHSALE_TEST_ARTIFACTS")
    folder = (Path(root) if root else tmp_path) / "warroom"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def _surge(room: WarRoom, stop: asyncio.Event, skus: list[str], placed: list[int]) -> None:
    """One of a few concurrent buyers' loops: ~15 orders a second each, until told to stop."""
    rng = random.Random()
    while not stop.is_set():
        status = await room.order(f"b{rng.randrange(400)}", rng.choice(skus))
        placed.append(status)
        await asyncio.sleep(0.06)


async def _shown_int(page: Any, selector: str) -> int:
    text = (await page.locator(selector).inner_text()).replace(",", "").strip()
    return int(text) if text.isdigit() else -1


async def _wait_for_shown(page: Any, selector: str, check: Any, timeout: float = 15.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await _shown_int(page, selector)
        if check(value):
            return value
        assert loop.time() < deadline, f"{selector} shows {value} after {timeout} s"
        await asyncio.sleep(0.1)


async def test_war_room_during_a_surge_in_headless_chromium(
    start_warroom: WarRoomFactory, pipeline_db_url: str, tmp_path: Path, record_property: Any
) -> None:
    _require_browser()
    from playwright.async_api import async_playwright

    await migrate_url(pipeline_db_url)
    room = await start_warroom(database_url=pipeline_db_url)
    skus = [
        {"sku": "phone-x", "stock": 500, "reserve": 150, "low_stock_line": 60, "limit_per_user": 2},
        {"sku": "earbuds", "stock": 90, "low_stock_line": 15},
        {"sku": "charger", "stock": 30, "reserve": 10, "low_stock_line": 8},
    ]
    sale = await room.create_sale(skus, hold_ttl_s=45)
    target = {
        "scenario": "midnight_surge (test)",
        "sale": sale,
        "points": [[0, 0], [5_000, 80], [20_000, 200], [60_000, 320]],
    }
    await expect_json(await room.http.put("/api/admin/warroom/target", json=target, headers=ADMIN), 200)

    stop = asyncio.Event()
    placed: list[int] = []
    buyers: list[asyncio.Task[None]] = []
    folder = _artifacts(tmp_path)
    problems: list[str] = []
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport=VIEWPORT)
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                page.on(
                    "console",
                    lambda msg: (
                        problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
                    ),
                )
                page.set_default_timeout(15_000)

                await page.goto(f"{room.base_url}/warroom?token={ADMIN_TOKEN}")
                # The token leaves the address bar at once (the tab keeps it in sessionStorage).
                await page.wait_for_function("() => !location.search.includes('token')")
                assert "token" not in page.url
                await page.wait_for_selector('.sku[data-sku="charger"][data-state="in_stock"]')

                # The surge starts while the page watches: numbers arrive and keep changing.
                buyers.extend(
                    asyncio.create_task(_surge(room, stop, [s["sku"] for s in skus], placed))
                    for _ in range(3)
                )
                first = await _wait_for_shown(page, "#v-created-total", lambda v: v > 0)
                await _wait_for_shown(page, "#v-created-total", lambda v: v > first)
                await page.wait_for_selector('#health[data-status="healthy"]')
                assert (await page.locator("#health-word").inner_text()) == "HEALTHY"
                assert (await page.locator("#phase").inner_text()) == "OPEN"
                assert (await page.locator("#countdown").inner_text()).startswith("T0 + ")
                assert "midnight_surge (test)" in await page.locator("#v-target-detail").inner_text()
                await page.wait_for_selector(
                    '.sku[data-sku="charger"][data-state="sold_out"]', timeout=20_000
                )
                assert (
                    "sold out at T0 + "
                    in await page.locator('.sku[data-sku="charger"] .sku-moment').inner_text()
                )
                surge_shot = folder / "warroom-surge.png"
                await page.screenshot(path=str(surge_shot), full_page=True)

                stop.set()
                await asyncio.gather(*buyers)
                assert 201 in placed

                # Release phone-x's reserve pool through the confirmation, once the page
                # shows the stock the surge left.
                row = page.locator('.sku[data-sku="phone-x"]')
                left = await expect_json(await room.http.get(f"/api/admin/sales/{sale}", headers=ADMIN), 200)
                available = left["skus"]["phone-x"]["available"]
                await page.wait_for_function(
                    "(n) => +document.querySelector('.sku[data-sku=\"phone-x\"]').dataset.available === n",
                    arg=available,
                )
                assert await row.get_attribute("data-reserve") == "150"
                box = await row.locator(".seg.available").bounding_box()
                assert box is not None
                await row.locator('button[data-action="release_reserve"]').click()
                dialog = page.locator("#confirm")
                await dialog.wait_for(state="visible")
                assert "phone-x" in await dialog.locator("#confirm-title").inner_text()
                assert "150 units" in await dialog.locator("#confirm-text").inner_text()
                await page.locator("#confirm-ok").click()
                await dialog.wait_for(state="hidden")

                # The stock bar grows by the pool (read from the page, not from the API).
                await page.wait_for_function(
                    "(before) => +document.querySelector('.sku[data-sku=\"phone-x\"]').dataset.available === before + 150",
                    arg=available,
                )
                await page.wait_for_function(
                    "(w) => document.querySelector('.sku[data-sku=\"phone-x\"] .seg.available').getBoundingClientRect().width > w + 100",
                    arg=box["width"],
                )
                assert await row.locator('button[data-action="release_reserve"]').is_disabled()
                await page.wait_for_selector('#log-rows tr[data-action="release_reserve"][data-outcome="ok"]')
                assert "PostgreSQL: written" in await page.locator("#toast").inner_text()
                await asyncio.sleep(0.5)  # let the bar's width transition finish for the picture
                after_shot = folder / "warroom-after-release.png"
                await page.screenshot(path=str(after_shot), full_page=True)

                # A reload finds the token in the tab (the address no longer has it): the
                # bare /warroom answers 401 with the token form, whose script comes back
                # with the tab's token. That 401 is the only console message allowed.
                seen = len(problems)
                await page.reload()
                await page.wait_for_selector('.sku[data-sku="phone-x"][data-reserve="0"]')
                assert "token" not in page.url and page.url.endswith("/warroom")
                reload_noise = problems[seen:]
                del problems[seen:]
                assert all("401 (Unauthorized)" in p for p in reload_noise), reload_noise
            finally:
                await browser.close()
    finally:
        stop.set()
        await asyncio.gather(*buyers, return_exceptions=True)

    for shot in (surge_shot, after_shot):
        assert shot.stat().st_size > 10_000
        record_property("screenshot", str(shot))
        print(f"war-room screenshot: {shot}")
    assert problems == [], problems
    counters = (await expect_json(await room.http.get(f"/api/admin/sales/{sale}", headers=ADMIN), 200))[
        "skus"
    ]["phone-x"]
    assert (counters["available"], counters["reserve"]) == (available + 150, 0)
    conn = await asyncpg.connect(pipeline_db_url)
    try:
        rows = await conn.fetch("SELECT action, sku, outcome FROM operator_log")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("release_reserve", "phone-x", "ok")]
