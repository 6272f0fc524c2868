"""report.html in a real browser with the network cut: it opens from the file alone, every
chart draws, hovering one second shows that second's figures in every chart's legend, dragging
across a chart zooms every chart into those seconds and a double-click zooms out. Debian's
headless Chromium through Playwright (``browser_support``); a screenshot is kept as a test
artifact (``$FLASHSALE_TEST_ARTIFACTS/report/`` or the test's tmp dir)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from browser_support import artifacts, browser_page, require_browser
from report_support import SPIKE_SECOND, two_kinds_report

#: The colour of "p99 corrected" on the latency chart (matplotlib's tab:red), drawn last.
P99_RGB = (0xD6, 0x27, 0x28)


async def _x_pixel(page: Any, chart: str, x: float) -> tuple[float, float]:
    """Where second ``x`` (from T0) of ``chart`` is on the screen, halfway up its plot."""
    box = await (await page.query_selector(f"#chart-{chart} .u-over")).bounding_box()
    left = await page.evaluate(
        "([name, x]) => window.runCharts.find(p => p.chartName === name).valToPos(x, 'x')", [chart, x]
    )
    return box["x"] + left, box["y"] + box["height"] / 2


async def _legend(page: Any, chart: str) -> dict[str, str]:
    return dict(
        await page.evaluate(
            """name => [...document.querySelectorAll('#chart-' + name + ' .u-legend .u-series')]
                .map(row => [row.querySelector('.u-label').textContent, row.querySelector('.u-value').textContent])""",
            chart,
        )
    )


async def _x_ranges(page: Any) -> list[tuple[float, float]]:
    pairs = await page.evaluate("window.runCharts.map(p => [p.scales.x.min, p.scales.x.max])")
    return [(float(lo), float(hi)) for lo, hi in pairs]


async def test_the_report_page_opens_offline_draws_and_zooms_and_hovers(tmp_path: Path) -> None:
    require_browser("report's browser test")
    _, folder = two_kinds_report(tmp_path / "report")
    rows = list(csv.DictReader((folder / "timeline.csv").read_text().splitlines()))
    spike = next(r for r in rows if int(r["second"]) == SPIKE_SECOND)
    names = sorted(p.stem for p in (folder / "plots").iterdir())
    problems: list[str] = []
    fetched: list[str] = []
    async with browser_page(problems, viewport={"width": 1200, "height": 900}, offline=True) as page:
        page.on("request", lambda request: fetched.append(request.url))
        await page.goto((folder / "report.html").as_uri())
        await page.wait_for_function(f"window.runCharts && window.runCharts.length === {len(names)}")
        # Nothing came from anywhere but the file itself (data: URLs are the PNGs inside it).
        assert [u for u in fetched if not u.startswith("data:")] == [(folder / "report.html").as_uri()]
        assert sorted(await page.evaluate("window.runCharts.map(p => p.chartName)")) == names

        # Every chart drew on its canvas; the latency chart's corrected p99 is there, in its colour.
        coloured = await page.evaluate(
            """([r, g, b]) => window.runCharts.map(p => {
                const c = p.ctx.canvas, d = p.ctx.getImageData(0, 0, c.width, c.height).data;
                let ink = 0, match = 0;
                for (let i = 0; i < d.length; i += 4) {
                  if (d[i + 3] > 0) ink++;
                  if (Math.abs(d[i] - r) + Math.abs(d[i + 1] - g) + Math.abs(d[i + 2] - b) < 40 && d[i + 3] > 200) match++;
                }
                return [p.chartName, ink, match];
            })""",
            list(P99_RGB),
        )
        assert all(ink > 1000 for _, ink, _ in coloured), coloured
        assert next(match for name, _, match in coloured if name == "latency") > 20, coloured

        # Hover the stalled second on the latency chart: its legend, and every other chart's
        # (the cursors follow one another), shows that second's figures.
        full = await _x_ranges(page)
        x = float(spike["t_from_t0_s"]) + 0.1
        await page.locator("#chart-latency").scroll_into_view_if_needed()
        await page.mouse.move(*await _x_pixel(page, "latency", x))
        latency = await _legend(page, "latency")
        assert float(latency["p99 raw"]) == round(float(spike["p99_ms"]))  # ≥ 100 ms: whole ms
        by_kind = await _legend(page, "latency_by_kind")
        assert float(by_kind["order p99"]) == round(float(spike["p99_ms_order"]))
        assert float(by_kind["browse p99"]) < 5
        requests = await _legend(page, "requests")
        assert float(requests["errors"]) == float(spike["errors"])
        assert requests["s"].endswith(" s")

        # Drag across seconds 2 to 8 of the requests chart: every chart zooms to them.
        await page.locator("#chart-requests").scroll_into_view_if_needed()
        start = await _x_pixel(page, "requests", 2.0)
        end = await _x_pixel(page, "requests", 8.0)
        await page.mouse.move(*start)
        await page.mouse.down()
        await page.mouse.move(end[0], end[1], steps=8)
        await page.mouse.up()
        zoomed = await _x_ranges(page)
        assert all(1.5 < lo < 2.5 and 7.5 < hi < 8.5 for lo, hi in zoomed), zoomed
        # A double-click zooms every chart out again.
        await page.mouse.dblclick(*end)
        assert await _x_ranges(page) == full
        await page.screenshot(path=str(artifacts(tmp_path, "report") / "report.png"), full_page=True)
    assert not problems, problems
