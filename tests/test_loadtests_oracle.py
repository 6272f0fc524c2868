"""flashsale's oracle on canned audits: clean passes; every planted violation fails; an audit
whose queue had not drained makes the run invalid ("not drained"), never "lost"."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from loadtests import exit_codes
from loadtests.history import Operation, merge_histories, read_history
from loadtests.oracle import VIOLATION_KINDS, read_payments, verdict_from_audit


def _clean_audit() -> dict[str, Any]:
    """A clean answer of POST /api/admin/audit (schema flashsale.audit/1) for two sales."""
    return {
        "schema": "flashsale.audit/1",
        "ok": True,
        "sales": ["d11-a", "old"],
        "drain": {"drained": True, "waited_s": 0.2, "outstanding": {}},
        "counts": {"holds_in_redis": 230, "orders_in_postgresql": 230, "acknowledged": 2, "dead_letters": 0},
        "violations_by_kind": {k: 0 for k in VIOLATION_KINDS},
        "skus": [
            {
                "sale": "d11-a",
                "sku": "phone",
                "total": 60,
                "available": 0,
                "held": 0,
                "sold": 50,
                "reserve": 10,
            },
            {
                "sale": "d11-a",
                "sku": "charger",
                "total": 500,
                "available": 320,
                "held": 0,
                "sold": 180,
                "reserve": 0,
            },
        ],
        "violations": [],
        "violations_not_listed": 0,
    }


def _plant(audit: dict[str, Any], kind: str, sale: str = "d11-a") -> None:
    audit["ok"] = False
    audit["violations"].append(
        {
            "kind": kind,
            "sale": sale,
            "where": "both",
            "detail": f"planted {kind}",
            "sku": "phone",
            "order_id": "d11-a.o9",
            "units": 1,
        }
    )
    audit["violations_by_kind"][kind] += 1


def _sku(audit: dict[str, Any], sku: str) -> dict[str, Any]:
    return next(s for s in audit["skus"] if s["sku"] == sku)


def _write_log(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


_SEQ = iter(range(10_000))


def _order(
    rid: str,
    oid: str | None,
    kind: str = "ok",
    *,
    replayed: bool = False,
    status: int | None = None,
    **value: Any,
) -> dict[str, Any]:
    """One order operation as the drill's personas write it (history format loadtests.history/1)."""
    return Operation(
        op=next(_SEQ),
        proc="p0",
        visit=f"v-{rid}",
        persona="buyer",
        f="order",
        intended=1.0,
        invoke=1.0,
        complete=1.1,
        type=kind,  # type: ignore[arg-type]
        status=status if status is not None else (201 if oid else 409),
        code="" if oid or kind != "fail" else "sold_out",
        key=rid,
        order=oid,
        item="phone" if oid else None,
        units=1 if oid else None,
        replayed=replayed,
        value=value,
    ).to_json()


def _pay(oid: str) -> dict[str, Any]:
    return Operation(
        op=next(_SEQ),
        proc="p0",
        visit="v",
        persona="buyer",
        f="pay",
        intended=2.0,
        invoke=2.0,
        complete=2.1,
        type="ok",
        status=200,
        value={"paid_order": oid},
    ).to_json()


@pytest.fixture
def log(tmp_path: Path) -> list[Operation]:
    lines = [
        _order("r1", "o1", pay_by_ms=1_000),
        _order("r2", "o2", pay_by_ms=2_000),
        _order("r2", "o2", replayed=True, pay_by_ms=2_000),  # a retry answered with the same order
        _order("r3", None, kind="fail"),
        _order("r4", None, kind="info", status=0),
        _pay("o1"),
    ]
    return list(read_history([_write_log(tmp_path / "requests.jsonl", lines)]))


def test_payments_and_what_the_clients_were_told(log: list[Operation]) -> None:
    from loadtests.history import summarize_history

    told = summarize_history(log, ("order",))
    assert told.acknowledged == ("o1", "o2")
    assert (told.attempts, told.ok, told.failed, told.unknown, told.replays) == (5, 3, 1, 1, 1)
    payments = read_payments(log)
    assert payments.paid == ("o1",) and payments.last_unpaid_pay_by_ms == 2_000  # o2 was never paid
    assert told.key_conflicts == {}
    assert told.failed_by_code == {"409:sold_out": 1}
    verdict = verdict_from_audit(_clean_audit(), log)
    assert verdict.history["paid"] == 1 and verdict.history["acknowledged"] == 2


def test_a_clean_audit_holds(log: Any) -> None:
    verdict = verdict_from_audit(_clean_audit(), log)
    assert verdict.invariants_held, verdict.failed
    assert verdict.drained and not verdict.not_judged
    # not_drained is the drain status, not a check: an undrained queue is not a violation.
    assert {c.name for c in verdict.checks} == {*VIOLATION_KINDS, "conservation", "holds_lapsed"} - {
        "not_drained"
    }


@pytest.mark.parametrize("kind", [k for k in VIOLATION_KINDS if k != "not_drained"])
def test_each_planted_violation_fails_its_check_and_only_it(kind: str, log: Any) -> None:
    audit = _clean_audit()
    _plant(audit, kind)
    verdict = verdict_from_audit(audit, log, sale="d11-a")
    assert [c.name for c in verdict.failed] == [kind]
    assert "planted" in verdict.failed[0].detail
    assert exit_codes.decide(invariants_held=verdict.invariants_held, run_valid=True, slo_passed=True) == 2


def test_another_sales_violations_are_not_this_drills(log: Any) -> None:
    audit = _clean_audit()
    _plant(audit, "oversold", sale="old")
    assert verdict_from_audit(audit, log, sale="d11-a").invariants_held
    assert not verdict_from_audit(audit, log).invariants_held  # unless judging every sale


def test_violations_the_audit_did_not_list_still_count(log: Any) -> None:
    audit = _clean_audit()
    audit["ok"] = False
    audit["violations_by_kind"]["lost"] = 250  # only the first 200 are listed; none of them here
    audit["violations_not_listed"] = 250
    verdict = verdict_from_audit(audit, log, sale="d11-a")
    assert [(c.name, c.observed) for c in verdict.failed] == [("lost", 250)]


def test_the_plural_dict_form_is_read_too(log: Any) -> None:
    audit = {
        "ok": False,
        "drained": True,
        "violations": {
            "oversold": [],
            "lost": [],
            "duplicates": [{"order_id": "o1"}],
            "limit_breaches": [],
            "leaked": [],
        },
        "skus": {"phone": {"total": 5, "available": 0, "held": 0, "sold": 5, "reserve": 0}},
    }
    assert [c.name for c in verdict_from_audit(audit, log).failed] == ["duplicate"]


def test_broken_conservation_fails(log: Any) -> None:
    audit = _clean_audit()
    _sku(audit, "phone")["sold"] = 51  # one unit sold that was never stocked: an oversell
    verdict = verdict_from_audit(audit, log)
    assert [c.name for c in verdict.failed] == ["conservation"]
    assert "phone" in verdict.failed[0].detail


def test_negative_counters_fail_conservation(log: Any) -> None:
    audit = _clean_audit()
    _sku(audit, "phone").update(available=-1, sold=51)
    assert [c.name for c in verdict_from_audit(audit, log).failed] == ["conservation"]


def test_holds_that_outlived_their_ttl_fail(log: Any) -> None:
    audit = _clean_audit()
    _sku(audit, "charger").update(available=318, held=2)
    assert [c.name for c in verdict_from_audit(audit, log).failed] == ["holds_lapsed"]


def test_an_undrained_queue_is_not_drained_even_if_not_listed_as_a_violation(log: Any) -> None:
    audit = _clean_audit()
    audit["drain"]["drained"] = False
    verdict = verdict_from_audit(audit, log)
    assert verdict.failed == [] and verdict.drained is False
    assert "lost" in [c.name for c in verdict.not_judged]


def test_an_undrained_queue_makes_lost_orders_not_judged_not_a_violation(log: Any) -> None:
    # `flashsale serve --embedded` runs no writer: the audit waits, gives up, and finds the
    # acknowledged orders missing in PostgreSQL. That is a backlog, not 56 lost orders.
    audit = _clean_audit()
    audit["drain"] = {"drained": False, "waited_s": 60.0, "outstanding": {"d11-a": 56}}
    _plant(audit, "not_drained")
    for _ in range(56):
        _plant(audit, "lost")
    _plant(audit, "conflict")
    verdict = verdict_from_audit(audit, log, sale="d11-a")
    assert verdict.invariants_held and not verdict.drained
    assert {c.name for c in verdict.not_judged} == {"lost", "conflict", "stock_mismatch"}
    assert "56" in verdict.drain_detail and "flashsale worker" in verdict.drain_detail
    # … but what a backlog cannot explain still counts.
    _plant(audit, "oversold")
    assert [c.name for c in verdict_from_audit(audit, log, sale="d11-a").failed] == ["oversold"]


def test_no_skus_in_the_audit_is_not_a_pass(log: Any) -> None:
    audit = _clean_audit()
    audit["skus"] = []
    assert "conservation" in [c.name for c in verdict_from_audit(audit, log).failed]


def test_oversold_is_also_judged_from_the_stock_figures(log: Any) -> None:
    audit = _clean_audit()
    _sku(audit, "phone").update(total=60, sold=55, held=6, reserve=0, available=-1)  # 61 of 60 given away
    verdict = verdict_from_audit(audit, log)
    assert {"oversold", "conservation"} <= {c.name for c in verdict.failed}
    assert "phone: 61 sold of 60 stocked" in next(c.detail for c in verdict.failed if c.name == "oversold")


def test_ok_false_without_a_named_violation_fails(log: Any) -> None:
    audit = copy.deepcopy(_clean_audit())
    audit["ok"] = False
    assert [c.name for c in verdict_from_audit(audit, log).failed] == ["audit_ok"]


def test_one_request_id_answered_with_two_orders_is_a_duplicate(tmp_path: Path) -> None:
    # Seen from the clients alone: a retry that bought again instead of replaying.
    a = _write_log(tmp_path / "a.jsonl", [_order("r7", "o7")])
    b = _write_log(tmp_path / "b.jsonl", [_order("r7", "o8", replayed=True)])
    merged = tmp_path / "requests.jsonl"
    assert merge_histories([a, b], merged) == 2
    verdict = verdict_from_audit(_clean_audit(), read_history([merged]))
    assert [c.name for c in verdict.failed] == ["duplicate"]
    assert "r7" in verdict.failed[0].detail and "clients" in verdict.failed[0].detail
