"""The report reads like the tools its users know (issue 14): p95 and mean beside p50/p90/p99,
requests and errors per second over time, latency over time per request kind, the machine,
versions and settings of the run, the generator-health figures behind "valid", and charts one
can zoom and hover in a page that opens offline — with the PNGs kept. Built from recorded
data, as ``test_loadtests_report`` does; the page in a real browser is
``test_loadtests_report_browser``."""

from __future__ import annotations

import csv
import json
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from report_support import SETTINGS, SPIKE_SECOND, two_kinds, two_kinds_report

from flashsale.drills.rehearse import format_verdict_table
from loadtests.latency import LatencyBook, new_histogram, to_us
from loadtests.report import Report, format_console, generator_health
from loadtests.slo import RunValidity, evaluate


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Path]:
    """One report for the tests that read it (drawing its PNGs takes seconds on a busy machine)."""
    return two_kinds_report(tmp_path_factory.mktemp("report"))


def _timeline(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "timeline.csv").read_text().splitlines()))


def _charts(page: str) -> dict[str, dict[str, Any]]:
    """The interactive charts' data in the page, by chart name."""
    found = re.search(r'<script type="application/json" id="run-charts">(.*?)</script>', page, re.S)
    assert found, "report.html carries no chart data"
    data = json.loads(found.group(1).replace("<\\/", "</"))
    return {c["name"]: {**c, "frame": data["frame"]} for c in data["charts"]}


def _series(chart: dict[str, Any]) -> dict[str, list[float | None]]:
    return {s["label"]: s["values"] for s in chart["series"]}


def _cell(value: str) -> float | None:
    return None if value == "" else float(value)


def test_p95_and_mean_beside_p50_p90_p99(made: tuple[Report, Path]) -> None:
    report, folder = made
    _, _, answered = two_kinds()
    reference = new_histogram()
    for seconds in answered["order"]:
        reference.record_value(to_us(seconds))
    order = report.summary["latency"]["raw"]["order"]
    assert order["p95_ms"] == reference.get_value_at_percentile(95) / 1000
    assert order["mean_ms"] == round(reference.get_mean_value() / 1000, 3)
    assert order["p50_ms"] < order["p90_ms"] <= order["p95_ms"] <= order["p99_ms"]
    # A k6-style threshold on p(95) and on the mean now has something to judge.
    assert [r.observed for r in evaluate(["latency{name:order}:p(95)<1"], report.summary)] == [
        order["p95_ms"]
    ]

    console = format_console(report.summary)
    head = next(line for line in console.splitlines() if "latency ms" in line)
    assert head.split()[2:] == ["p50", "p90", "p95", "p99", "p99.9", "max", "mean", "count"]
    row = next(line for line in console.splitlines() if line.strip().startswith("order raw"))
    assert f"{order['p95_ms']:.1f}" in row.split() and f"{order['mean_ms']:.1f}" in row.split()

    # flashsale rehearse's own verdict table shows the same columns.
    assert head in format_verdict_table(report.summary, folder).splitlines()

    page = (folder / "report.html").read_text()
    latency_table = page[page.index("<h2>Latency (ms)</h2>") :].split("</table>")[0]
    assert "<th>p95</th>" in latency_table and "<th>mean</th>" in latency_table
    assert f"<td>{order['p95_ms']:.1f}</td>" in latency_table

    rows = _timeline(folder)
    assert {"p90_ms", "p95_ms", "mean_ms"} <= set(rows[0])
    spike = rows[SPIKE_SECOND]
    assert float(spike["p95_ms"]) >= 400 and float(spike["mean_ms"]) > float(rows[2]["mean_ms"])
    assert _series(_charts(page)["latency"]).keys() >= {
        "p50 raw",
        "p90 raw",
        "p95 raw",
        "p99 raw",
        "mean raw",
    }


def test_requests_and_errors_per_second_over_time(made: tuple[Report, Path]) -> None:
    report, folder = made
    rows = _timeline(folder)
    # 2 processes × 10 a second of each kind; orders 0 and 5 of each ten are unexpected 500s.
    # (By completion second: the spike's slow orders land in the second after it.)
    steady = [rows[s] for s in range(12) if s not in (SPIKE_SECOND, SPIKE_SECOND + 1)]
    assert all(int(r["requests_browse"]) == int(r["requests_order"]) == 20 for r in steady)
    assert all(int(r["errors_order"]) == 4 and int(r["errors_browse"]) == 0 for r in steady)
    assert sum(int(r["errors"]) for r in rows) == report.summary["throughput"]["errors"] == 48
    throughput = report.summary["throughput"]
    assert throughput["requests"] == 480 and throughput["requests_per_s"] == 40.0
    assert throughput["requests_per_s_peak"] == max(int(r["requests"]) for r in rows)
    assert throughput["errors_per_s"] == 4.0 and throughput["errors_per_s_peak"] == 4
    assert report.summary["requests"]["order"]["errors_per_s"] == 4.0
    assert report.summary["requests"]["browse"]["peak_per_s"] == 20

    page = (folder / "report.html").read_text()
    chart = _charts(page)["requests"]
    series = _series(chart)
    assert series["all requests"] == [float(r["requests"]) for r in rows]
    assert series["errors"] == [float(r["errors"]) for r in rows]
    assert series["order"] == [float(r["requests_order"]) for r in rows]
    assert (folder / "plots" / "requests.png").is_file()
    assert "<h2>Requests</h2>" in page
    assert "requests: 480 (40.0/s, busiest second" in format_console(report.summary)


def test_latency_over_time_per_request_kind(made: tuple[Report, Path]) -> None:
    _, folder = made
    rows = _timeline(folder)
    spike, calm = rows[SPIKE_SECOND], rows[3]
    assert float(spike["p99_ms_order"]) >= 400 and float(spike["p50_ms_order"]) >= 400
    assert float(spike["p99_ms_browse"]) < 5  # browsing stayed fast while orders stalled
    assert 20 <= float(calm["p99_ms_order"]) < 40 and float(calm["p99_corrected_ms_order"]) < 40
    chart = _charts((folder / "report.html").read_text())["latency_by_kind"]
    series = _series(chart)
    assert set(series) == {"browse p99", "browse p50", "order p99", "order p50"}
    assert series["order p99"] == [_cell(r["p99_ms_order"]) for r in rows]
    assert chart["scale"] == "log"
    assert (folder / "plots" / "latency_by_kind.png").is_file()


def test_each_kinds_seconds_merge_exactly_across_processes() -> None:
    processes, collector = [LatencyBook(0.0), LatencyBook(0.0)], LatencyBook(0.0)
    for i in range(400):
        at = i * 0.05
        processes[i % 2].record("order" if i % 3 else "pay", intended=at, sent=at, done=at + 0.001 * (i % 40))
        if i % 97 == 0:
            collector.absorb(json.loads(json.dumps(processes[i % 2].export())))
    for p in processes:
        collector.absorb(p.export())
    for name in ("order", "pay"):
        counted = sum(collector.interval(s, name)[0].get_total_count() for s in collector.seconds())
        assert counted == collector.total(f"{name}.raw").get_total_count() > 0
    assert all(
        collector.interval(s)[0].get_total_count()
        == sum(collector.interval(s, n)[0].get_total_count() for n in ("order", "pay"))
        for s in collector.seconds()
    )


def test_the_machine_versions_and_settings_of_the_run(made: tuple[Report, Path]) -> None:
    _, folder = made
    summary = json.loads((folder / "summary.json").read_text())
    machine = summary["machine"]
    assert machine["host"] == platform.node() and machine["cpus"] >= 1 and machine["python"]
    assert set(summary["generator"]["machines"]) == {"p0", "p1"}  # what each load process ran on
    assert summary["generator"]["machines"]["p0"]["cpus_usable"] >= 1
    versions = summary["versions"]
    assert versions["python"] == platform.python_version() and versions["uplot"] == "1.6.32"
    assert versions["locust"][0].isdigit() and versions["hdrhistogram"][0].isdigit()
    assert summary["run"]["settings"] == SETTINGS
    page = (folder / "report.html").read_text()
    environment = page[page.index("<h2>The run's machine, versions and settings</h2>") :]
    for shown in (
        machine["host"],
        f"<td>locust</td><td>{versions['locust']}</td>",
        "<td>shop_db</td><td>shop.db</td>",
    ):
        assert shown in environment, shown


def test_the_settings_mask_secrets_and_passwords() -> None:
    """The plugin's settings and command line, as the report shows them: the drill's admin
    token (a secret option) and a URL's password never reach the report. In a subprocess:
    Locust patches the standard library when imported."""
    code = """
import json, locust.argument_parser as ap
import loadtests.surge  # the drill's options, --admin-token among them (is_secret)
from loadtests.plugin import run_command, run_settings
parser = ap.get_parser()
argv = ["locust", "-f", "surge.py", "--admin-token", "tok-123", "--host=http://ops:pw-456@127.0.0.1:1",
        "--admin-token=tok-789", "--peak-rps", "30"]
options = parser.parse_args(argv[1:])
print(json.dumps({"command": run_command(argv, parser), "settings": run_settings(options, parser)}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    for secret in ("tok-123", "pw-456", "tok-789"):
        assert secret not in done.stdout, secret
    settings = out["settings"]
    assert settings["admin_token"] == "(secret)" and settings["host"] == "http://ops:***@127.0.0.1:1"
    assert settings["peak_rps"] == 30.0 and settings["shape"] == "midnight_surge"  # the kit's own
    assert settings["hold_ttl"] == -1.0  # the locustfile's own options too
    assert "users" not in settings and "web_port" not in settings  # Locust's own, beside the point here
    assert "--admin-token '(secret)'" in out["command"] and "--peak-rps 30" in out["command"]


def test_the_generator_health_figures_behind_valid(made: tuple[Report, Path], tmp_path: Path) -> None:
    report, folder = made
    summary = report.summary
    assert summary["validity"]["valid"] and summary["validity"]["bounds"]["max_cpu_percent"] == 90.0
    page = (folder / "report.html").read_text()
    health = page[page.index("the figures behind that word") :].split("</table>")[0]
    assert "process p0 (" in health and "CPU in its busiest second</td><td>51 %" in health
    assert "share of seconds above 90 % CPU</td><td>0%</td><td>≤ 10%</td><td>ok" in health
    assert "arrival dispatcher" not in health  # these arrivals were not dispatched by the kit
    console = format_console(summary)
    assert "✓ process p1: share of seconds above 90 % CPU" in console

    # The same run judged against a CPU bound of 45 %: the busy seconds make it invalid, and
    # the figure that did it says so beside its bound.
    report, _ = two_kinds_report(tmp_path, plots=False, bounds=RunValidity(max_cpu_percent=45.0))
    summary = report.summary
    assert not summary["validity"]["valid"] and summary["generator"]["cpu_busy_ratio"]["p0"] == 0.5
    assert "above 45% CPU for 50% of the run" in summary["validity"]["reasons"][0]
    assert "✗ process p0: share of seconds above 45 % CPU" in format_console(summary)
    assert ("process p0: share of seconds above 45 % CPU", "50%", "≤ 10%", "FAIL") in generator_health(
        summary
    )


def test_the_page_opens_offline_with_every_chart_and_its_png(made: tuple[Report, Path]) -> None:
    report, folder = made
    page = (folder / "report.html").read_text()
    # Nothing to fetch: no script, style, image or font from anywhere but the page itself.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(r"""@import|url\(\s*["']?(https?:)?//""", page, re.I)
    assert "<link" not in page
    assert "var uPlot=" in page  # the chart library is inlined
    charts = _charts(page)
    pngs = sorted(p.stem for p in (folder / "plots").iterdir())
    assert (
        sorted(charts)
        == pngs
        == sorted(["arrivals", "requests", "latency", "latency_by_kind", "orders", "generator"])
    )
    for name in charts:  # each chart: a place to draw it, and its PNG for a post-mortem
        figure = page[page.index(f'<figure class="chart" id="chart-{name}">') :].split("</figure>")[0]
        assert '<div class="plot"></div>' in figure and "data:image/png;base64," in figure
    assert page.count("data:image/png;base64,") == len(pngs)
    assert all(f"plots/{p}.png" in report.summary["files"] for p in pngs)
