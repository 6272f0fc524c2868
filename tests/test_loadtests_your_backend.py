"""A user's own rehearsal of the example shop, written here with nothing but the documented API
(``loadtests.__all__``): new personas, an own shape from a table, a setup hook, an oracle that
reads the shop's ledger over HTTP and adds named checks of its own. If it needed a private
name, the API would not be done: the test checks it does not.

Each named check must reach the verdict, the report and the exit code.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from shop_support import LOOSE_SLO, LocustRun, run_locust, running_shop, shop_command

import loadtests
from loadtests import exit_codes

LOCUSTFILE = '''
"""My rehearsal of the example shop: gift buyers take two of the scarcest item at once."""

import json
import urllib.request

from loadtests import (
    Check,
    OracleContext,
    ProcessContext,
    Rehearsal,
    SetupContext,
    Shape,
    Truth,
    Visit,
    Window,
    rate_table,
)

rehearsal = Rehearsal("gift rush", order_operations=("buy",), default_shape="gift_rush")


def get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@rehearsal.shape("gift_rush")
def gift_rush(peak_rps: float, time_scale: float) -> Shape:
    t0 = 2.0 * time_scale
    return rate_table(
        [(0, peak_rps / 4), (t0, peak_rps), (t0 + 3 * time_scale, peak_rps / 2)],
        step=True,
        impulses=[(t0, peak_rps)],
        t0_s=t0,
        windows=[Window("waiting", 0, t0, "countdown"), Window("rush", t0, t0 + 3 * time_scale, "open")],
    )


@rehearsal.setup
def look_at_the_shelves(ctx: SetupContext) -> dict:
    left = {i["item"]: i["left"] for i in get(f"{ctx.host}/items")["items"]}
    scarce = min(left, key=lambda item: left[item])
    ctx.note("scarce item", scarce)
    return {"scarce": scarce}


@rehearsal.process_setup
def remember(ctx: ProcessContext) -> str:
    return ctx.shared["scarce"]


@rehearsal.persona(weight=1, kinds=("countdown", "open"))
def window_shopper(visit: Visit) -> None:
    with visit.get(f"/items/{visit.state}", name="look", history=False) as call:
        if call.status == 200:
            call.ok()


@rehearsal.persona(weight=2, kinds=("rendezvous", "open"))
def gift_buyer(visit: Visit) -> None:
    key = f"gift-{visit.id}"
    body = {"item": visit.state, "quantity": 2, "idempotency_key": key}
    with visit.post("/checkout", name="buy", key=key, json=body) as call:
        if call.status in (200, 201):
            call.ok(order=call.body["order"], item=visit.state, units=2, replayed=call.body.get("replayed", False))
        elif call.status == 409:
            call.refused(call.body["reason"])


@rehearsal.oracle
def ledger(ctx: OracleContext) -> Truth:
    ledger = get(f"{ctx.host}/ledger")
    sold = {}
    for order in ledger["orders"]:
        sold[order["item"]] = sold.get(order["item"], 0) + order["quantity"]
    negative = {item: n for item, n in ledger["left"].items() if n < 0}
    adds_up = {i: ledger["stocked"][i] - sold.get(i, 0) == ledger["left"][i] for i in ledger["stocked"]}
    return Truth(
        stocked=ledger["stocked"],
        sold=sold,
        recorded=[o["order"] for o in ledger["orders"]],
        checks=[
            Check("stock_never_negative", not negative, len(negative), json.dumps(negative) if negative else ""),
            Check("ledger_adds_up", all(adds_up.values()), sum(not ok for ok in adds_up.values())),
        ],
        figures={"gifts_told": len(ctx.history.acknowledged)},
    )


ArrivalDriver, ArrivalShape = rehearsal.locust_classes()
'''


def test_it_uses_only_the_documented_api() -> None:
    tree = ast.parse(LOCUSTFILE)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loadtests"):
            assert node.module == "loadtests", f"imports a submodule: {node.module}"
            for alias in node.names:
                assert alias.name in loadtests.__all__, f"{alias.name} is not in loadtests.__all__"
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("loadtests.") for a in node.names)
        if isinstance(node, ast.Attribute):
            assert not node.attr.startswith("_"), f"uses a private name: .{node.attr}"


def _rehearse(variant: str, tmp_path: Path, *extra: str) -> LocustRun:
    locustfile = tmp_path / "gift_rush.py"
    locustfile.write_text(LOCUSTFILE)
    with running_shop(shop_command(variant, tmp_path / "shop.db"), tmp_path) as shop:
        return run_locust(
            [
                "locust",
                "-f",
                str(locustfile),
                "--headless",
                "--host",
                shop.url,
                "--peak-rps",
                "30",
                "--lead",
                "2",
            ]
            + ["--slo", LOOSE_SLO, *extra],
            tmp_path,
            tmp_path / "report",
        )


@pytest.fixture(scope="module")
def naive(tmp_path_factory: pytest.TempPathFactory) -> LocustRun:
    return _rehearse("naive", tmp_path_factory.mktemp("naive"))


@pytest.mark.timeout(240)
def test_the_naive_shop_fails_the_kits_and_the_users_checks(naive: LocustRun) -> None:
    assert naive.code == exit_codes.INVARIANT_VIOLATED, naive.explain()
    s = naive.summary
    failed = [c["name"] for c in s["oracle"]["checks"] if not c["passed"]]
    assert failed == ["oversold", "stock_never_negative"], s["oracle"]["checks"]
    # In the verdict, the report and the exit code, the user's check as much as the kit's.
    assert s["exit_meaning"] == "invariant violated: oversold, stock_never_negative"
    assert "✗ stock_never_negative" in naive.out and "✓ ledger_adds_up" in naive.out
    page = (naive.report / "report.html").read_text()
    assert "stock_never_negative" in page and "ledger_adds_up" in page
    assert s["oracle"]["log"]["gifts_told"] == s["oracle"]["log"]["acknowledged"] > 1
    # The user's own shape, setup and personas ran.
    assert s["run"]["shape"] == "gift_rush" and s["run"]["scarce item"] == "mug"
    assert set(s["requests"]) == {"buy", "look"}
    history = [json.loads(line) for line in (naive.report / "requests.jsonl").read_text().splitlines()]
    assert {h["persona"] for h in history} == {"gift_buyer"}  # window shoppers' looks are not in it
    assert {h["units"] for h in history if h["type"] == "ok"} == {2}


@pytest.mark.timeout(240)
def test_the_correct_shop_passes_them(tmp_path: Path) -> None:
    run = _rehearse("correct", tmp_path, "--no-plots")
    assert run.code == exit_codes.OK, run.explain()
    checks = {c["name"]: c["passed"] for c in run.summary["oracle"]["checks"]}
    assert checks == dict.fromkeys(
        ["oversold", "lost", "duplicate", "stock_never_negative", "ledger_adds_up"], True
    )
    assert run.summary["exit_meaning"] == exit_codes.MEANING[exit_codes.OK]
