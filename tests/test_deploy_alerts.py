"""The alerts shipped with ``deploy/`` and the metrics they read, checked by the tool Prometheus
users check them with:

- ``promtool check rules`` on ``deploy/prometheus/flashsale.rules.yml``, and ``promtool test
  rules`` on its unit tests, which show every alert once firing and once silent;
- every alert says what happened and points at its section of docs/alerts.md;
- compose's Prometheus loads the rules where they are mounted (``promtool check config`` on
  the files laid out as the container sees them);
- ``promtool check metrics`` on the real ``/metrics`` of a running service — one process,
  and ``flashsale serve --workers 2`` (prometheus-client's multi-process mode) — and the rules
  and the dashboard read only metrics that body has.

A missing promtool skips with the reason, except under ``CI=true``, where it fails
(``bash .ci/install-deploy-tools`` installs it), as in test_deploy.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from service_support import ADMIN, Service, ServiceFactory, buyer, expect_json, new_id
from service_support import start_service as start_service  # noqa: F401  (fixture)
from test_deploy import (
    DASHBOARD,
    DEPLOY,
    ROOT,
    _argv,
    _expand,
    _metric_constants,
    _missing,
    _mounts,
    _queries,
    _run,
    _yaml,
)
from test_deploy import compose as compose  # noqa: F401  (fixture)
from test_deploy import compose_tool as compose_tool  # noqa: F401  (fixture)
from test_deploy import promtool as promtool  # noqa: F401  (fixture)
from test_service_serve import _children, _wait_until_serving
from test_service_serve import serve_two as serve_two  # noqa: F401  (fixture)

from flashsale.service.metrics import FLUSH_INTERVAL_S
from flashsale.service.waiting_room import TICKET_HEADER

RULES = DEPLOY / "prometheus" / "flashsale.rules.yml"
RULES_TESTS = DEPLOY / "prometheus" / "flashsale.rules.test.yml"
ALERTS_DOC = ROOT / "docs" / "alerts.md"

#: What issue 14 asked the alerts to catch, by the name each one has.
EXPECTED_ALERTS = {
    "FlashsaleWriterStalled",  # no commit for a while, backlog > 0
    "FlashsaleBacklogGrowing",
    "FlashsalePostgresDown",  # issue 12 item 8: reported, no longer a readiness failure
    "FlashsaleOrdersShed",  # 429 overloaded / rate_limited
    "FlashsaleOrderLatencyOverSLO",  # order p99
    "FlashsaleSaleFenced",
    "FlashsaleDeadLetters",
    "FlashsaleAuditViolations",
}
METRIC_NAME = re.compile(r"\b(?:flashsale|process)_[a-z_]+\b")


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    loaded = _yaml().safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def test_rules_pass_promtool_check_rules(promtool: str, rules: list[dict[str, Any]]) -> None:  # noqa: F811
    result = _run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_rules_pass_their_unit_tests(promtool: str) -> None:  # noqa: F811
    result = _run([promtool, "test", "rules", str(RULES_TESTS)], cwd=RULES_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_asked_for_are_there(rules: list[dict[str, Any]]) -> None:
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS


def test_every_alert_is_tested_firing_and_silent(rules: list[dict[str, Any]]) -> None:
    unit = _yaml().safe_load(RULES_TESTS.read_text())
    assert unit["rule_files"] == [RULES.name]
    cases = [case for test in unit["tests"] for case in test.get("alert_rule_test", [])]
    for rule in rules:
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} is never tested firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never tested silent"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_says_what_happened_and_what_to_do(rules: list[dict[str, Any]]) -> None:
    doc = ALERTS_DOC.read_text(encoding="utf-8")
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    for rule in rules:
        name, annotations = rule["alert"], rule["annotations"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert annotations["summary"] and annotations["description"], name
        page, _, anchor = annotations["runbook"].partition("#")
        assert page == "docs/alerts.md" and anchor in anchors, f"{name}: runbook {annotations['runbook']}"
        assert anchor == _anchor(name), f"{name}: its section is #{_anchor(name)}"


def test_compose_prometheus_loads_the_rules(
    compose: dict[str, Any],  # noqa: F811
    promtool: str,  # noqa: F811
    rules: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Lay out /etc/prometheus as compose mounts it, then let promtool read the config from
    there: the rule_files pattern must find the rules (a pattern matching nothing is valid)."""
    prometheus = compose["services"]["prometheus"]
    config = next(a.split("=", 1)[1] for a in _argv(prometheus["command"]) if a.startswith("--config.file="))
    etc = Path(config).parent
    laid = 0
    for target, source in _mounts(prometheus).items():
        if Path(target).is_relative_to(etc) and Path(source).is_file():
            copy = tmp_path / Path(target).relative_to(etc)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
            laid += 1
    assert laid >= 2, f"compose mounts no rules under {etc}: {_mounts(prometheus)}"
    rules_mounted = [t for t, s in _mounts(prometheus).items() if Path(s).resolve() == RULES.resolve()]
    assert rules_mounted, f"compose does not mount {RULES.relative_to(ROOT)}"
    result = _run([promtool, "check", "config", str(tmp_path / Path(config).name)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout
    checked = re.search(
        rf"Checking \S*/{re.escape(RULES.name)}\n\s*SUCCESS: (\d+) rules found", result.stdout
    )
    assert checked and int(checked.group(1)) == len(rules), result.stdout


# ---------------------------------------------------------------- the real /metrics


@pytest.fixture
async def busy_metrics(
    start_service: ServiceFactory,  # noqa: F811
    pipeline_db_url: str,
    redis_client: Redis,
    writer_running: Any,
    drained: Any,
) -> str:
    """/metrics of one service process that has seen every kind of series: orders of several
    outcomes, a lookup, an unknown path, a writer that committed, an audit."""
    service = await start_service(database_url=pipeline_db_url)
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 2, "reserve": 1}]))["sale"]
    order_id = (await expect_json(await service.order("alice", sku), 201))["order_id"]
    await expect_json(await service.order("bob", sku, 5), 409, "sold_out")
    await expect_json(await service.order("carol", sku, 0), 422)
    await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice"))
    await service.client.get("/no/such/path")
    async with writer_running():
        await drained(redis_client, [sale])
    await expect_json(await service.client.post("/api/admin/audit", json={}, headers=ADMIN), 200)
    await _room_sale_with_a_sell_out(service)
    resp = await service.client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


async def _room_sale_with_a_sell_out(service: Service) -> None:
    """A sale behind its waiting room: one buyer admitted who buys the only unit, one still
    waiting for a SKU in stock, one told the other sold out (every flashsale_room_* series)."""
    one, many = new_id("sku"), new_id("sku")
    sale = new_id("room")
    await service.create_sale(
        [{"sku": one, "stock": 1}, {"sku": many, "stock": 5}], sale=sale, waiting_room={"rate_per_s": 1}
    )

    async def join(user: str, sku: str) -> Any:
        resp = await service.client.post(f"/api/sales/{sale}/room", json={"skus": [sku]}, headers=buyer(user))
        return await expect_json(resp, 200)

    ticket = (await join("ann", one))["ticket"]
    assert (await join("ben", one))["state"] == "waiting"
    await join("cid", many)
    order = await service.client.post(
        "/api/orders",
        json={"request_id": "r-ann", "sku": one},
        headers=buyer("ann", extra={TICKET_HEADER: ticket}),
    )
    paid = await service.client.post(
        f"/api/orders/{(await expect_json(order, 201))['order_id']}/pay", headers=buyer("ann")
    )
    await expect_json(paid, 200)
    resp = await service.client.get(f"/api/sales/{sale}/room", headers=buyer("ben"))
    assert (await expect_json(resp, 200))["state"] == "sold_out"


def _check_metrics(promtool: str, body: str) -> None:  # noqa: F811
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60, check=False
    )
    # promtool exits 0 with nothing to say, or names each problem (and exits non-zero).
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), result.stdout + result.stderr


def _sample_names(body: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(body) for s in family.samples}


def test_service_metrics_pass_promtool_check_metrics(busy_metrics: str, promtool: str) -> None:  # noqa: F811
    _check_metrics(promtool, busy_metrics)


def test_alerts_and_dashboard_read_only_metrics_the_service_serves(
    busy_metrics: str, rules: list[dict[str, Any]]
) -> None:
    served = _sample_names(busy_metrics)
    for rule in rules:
        read = set(METRIC_NAME.findall(rule["expr"]))
        assert read and read <= served, f"{rule['alert']} reads {sorted(read - served)}, which /metrics lacks"
    dashboard = json.loads(DASHBOARD.read_text())
    constants = _metric_constants(dashboard)
    for title, expr in _queries(dashboard):
        read = set(METRIC_NAME.findall(_expand(expr, constants)))
        assert read <= served, f"panel {title!r} reads {sorted(read - served)}, which /metrics lacks"


def test_the_docs_list_every_metric_the_service_serves(busy_metrics: str) -> None:
    families = {family.name for family in text_string_to_metric_families(busy_metrics)}
    served = {name for name in families if name.startswith("flashsale_")}
    table = ALERTS_DOC.read_text(encoding="utf-8").split("## What /metrics serves", 1)[1].split("\n## ", 1)[0]
    listed = {
        name.removesuffix("_total")  # the table names counters as they are queried
        for name in re.findall(r"^\| `(flashsale_\w+)`", table, re.M)
    }
    assert listed == served, (
        f"docs/alerts.md lists {sorted(listed - served)}, lacks {sorted(served - listed)}"
    )
    assert any(name.startswith("process_") for name in families)


def test_the_docs_configmap_command_carries_the_rules() -> None:
    """docs/alerts.md's command for a Prometheus without the operator, run as a dry run."""
    (command,) = re.findall(r"`(kubectl create configmap [^`]+)`", ALERTS_DOC.read_text(encoding="utf-8"))
    if shutil.which("kubectl") is None:
        _missing("kubectl")
    result = _run([*command.split(), "--dry-run=client", "-o", "json"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"] == {RULES.name: RULES.read_text(encoding="utf-8")}


def _rss_bytes(pid: int) -> int:
    import os

    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_serve_with_two_processes_passes_promtool_check_metrics(
    serve_two: tuple[subprocess.Popen[bytes], int, str],  # noqa: F811
    promtool: str,  # noqa: F811
) -> None:
    """Multi-process mode merges the processes' files; process_* are added up over the
    service processes, once, without a per-process label."""
    proc, port, _ = serve_two
    await _wait_until_serving(proc, port)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(10):
            body = {"request_id": f"r-{i}", "sku": "x", "qty": 0}
            async with http.post(f"{base}/api/orders", json=body, headers=buyer(f"u{i}")) as resp:
                assert resp.status == 422
        # The process that answers the scrape shows the other's answers once that one has
        # written them (every FLUSH_INTERVAL_S): until both show, bounded.
        deadline = time.monotonic() + 10 * FLUSH_INTERVAL_S
        while True:
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
            families = {family.name: family for family in text_string_to_metric_families(text)}
            answers = [
                s
                for s in families["flashsale_responses"].samples
                if s.labels.get("route") == "/api/orders" and s.labels.get("code") == "422"
            ]
            if [s.value for s in answers] == [10] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    workers = _children(proc.pid)
    _check_metrics(promtool, text)
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        (sample,) = families[name].samples
        assert sample.labels == {}, sample
    (rss,) = families["process_resident_memory_bytes"].samples
    # A sum over both workers: more than either one alone.
    assert len(workers) == 2 and rss.value > max(_rss_bytes(pid) for pid in workers)
    assert [s.value for s in answers] == [10]
