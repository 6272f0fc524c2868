"""The kit's business verdict: a backend's Truth judged against what the clients were told —
oversold, lost, duplicate and the user's own checks; "not judged" never passes; a backend
that had not drained is not judged "lost"; and the one-line meaning of each exit code."""

from __future__ import annotations

import pytest

from loadtests import exit_codes
from loadtests.history import Operation, summarize_history
from loadtests.verdict import Check, Recorded, Truth, format_verdict, judge

_N = iter(range(10_000))


def _op(
    kind: str, *, order: str | None = None, key: str | None = None, item: str = "mug", units: int = 1
) -> Operation:
    return Operation(
        op=next(_N),
        proc="local",
        visit="v",
        persona="buyer",
        f="checkout",
        intended=1.0,
        invoke=1.0,
        complete=1.2,
        type=kind,  # type: ignore[arg-type]
        status={"ok": 201, "fail": 409, "info": 0}[kind],
        code={"ok": "", "fail": "out_of_stock", "info": "no_answer"}[kind],
        key=key,
        order=order,
        item=item if order else None,
        units=units if order else None,
    )


TOLD = summarize_history(
    [
        _op("ok", order="o1", key="k1"),
        _op("ok", order="o2", key="k2", units=2),
        _op("ok", order="o2", key="k2", units=2),  # a replay: one order, counted once
        _op("fail", key="k3"),
        _op("info", key="k4"),
        Operation(1000, "local", "v", "browser", "item page", 1.0, 1.0, 1.1, "ok", 200),
    ],
    ["checkout"],
)


def _checks(truth: Truth) -> dict[str, tuple[bool, object]]:
    return {c.name: (c.passed, c.observed) for c in judge(truth, TOLD).checks}


def test_what_the_clients_were_told() -> None:
    assert TOLD.acknowledged == ("o1", "o2") and TOLD.acknowledged_units == {"mug": 3}
    assert (TOLD.attempts, TOLD.ok, TOLD.failed, TOLD.unknown) == (5, 3, 1, 1)
    assert TOLD.keys == {"k1", "k2", "k3", "k4"}
    assert TOLD.by_operation["item page"] == {"ok": 1, "fail": 0, "info": 0}


def test_a_clean_truth_holds() -> None:
    truth = Truth(stocked={"mug": 3}, sold={"mug": 3}, recorded=["o1", Recorded("o2", "k2")])
    verdict = judge(truth, TOLD)
    assert verdict.invariants_held and verdict.judged and not verdict.not_judged
    assert [c.name for c in verdict.checks] == ["oversold", "lost", "duplicate"]


def test_oversold_is_sold_beyond_stocked_per_item() -> None:
    truth = Truth(stocked={"mug": 3, "tee": 5}, sold={"mug": 5, "tee": 5, "cap": 1}, recorded=["o1", "o2"])
    verdict = judge(truth, TOLD)
    assert [(c.name, c.observed) for c in verdict.failed] == [("oversold", 3)]  # 2 mugs + 1 cap never stocked
    assert verdict.failed[0].detail == "cap: 1 sold of 0 stocked; mug: 5 sold of 3 stocked"


def test_an_acknowledged_order_not_recorded_is_lost() -> None:
    checks = _checks(Truth(stocked={"mug": 3}, sold={"mug": 1}, recorded=["o1", "other-run"]))
    assert checks["lost"] == (False, 1) and checks["oversold"] == (True, 0)


@pytest.mark.parametrize(
    "recorded",
    [
        ["o1", "o2", "o2"],  # one acknowledged order recorded twice
        ["o1", Recorded("o2", "k2"), Recorded("o3", "k2")],  # one key, two orders in the backend
    ],
)
def test_duplicates_seen_by_the_backend(recorded: list[str | Recorded]) -> None:
    assert _checks(Truth(stocked={"mug": 9}, sold={"mug": 3}, recorded=recorded))["duplicate"] == (False, 1)


def test_a_key_answered_with_two_orders_is_a_duplicate_without_any_records() -> None:
    told = summarize_history([_op("ok", order="o1", key="k"), _op("ok", order="o9", key="k")], ["checkout"])
    verdict = judge(Truth(stocked={"mug": 9}, sold={"mug": 2}), told)
    assert [c.name for c in verdict.failed] == ["duplicate"] and "clients" in verdict.failed[0].detail
    # Records from other traffic (keys this run never sent) are not this run's duplicates.
    other = [Recorded("o1", "k"), Recorded("o9", "k"), Recorded("x1", "z"), Recorded("x2", "z")]
    assert judge(Truth(stocked={"mug": 9}, sold={"mug": 2}, recorded=other), told).failed[0].observed == 1


def test_what_the_oracle_did_not_give_is_not_judged_never_passed() -> None:
    verdict = judge(Truth(), TOLD)
    assert [c.name for c in verdict.checks] == ["duplicate"]  # from the history alone
    assert [c.name for c in verdict.not_judged] == ["oversold", "lost"]
    assert all(c.detail.startswith("not judged") for c in verdict.not_judged)
    assert "not judged" in format_verdict(verdict)


def test_the_users_checks_count_and_merge_with_the_kits() -> None:
    truth = Truth(
        stocked={"mug": 3},
        sold={"mug": 3},
        recorded=["o1", "o2"],
        checks=[
            Check("refunds_balance", False, 2, "two refunds without a return"),
            Check("lost", False, 1, "the warehouse never saw o2"),
        ],
    )
    verdict = judge(truth, TOLD)
    assert [(c.name, c.observed) for c in verdict.failed] == [("lost", 1), ("refunds_balance", 2)]
    assert "warehouse" in verdict.failed[0].detail
    with pytest.raises(ValueError, match="two checks of one name"):
        judge(Truth(checks=[Check("x", True), Check("x", True)]), TOLD)


def test_not_drained_leaves_what_needs_a_complete_record_unjudged() -> None:
    truth = Truth(
        stocked={"mug": 3},
        sold={"mug": 3},
        recorded=["o1"],  # o2 is still in the backend's queue
        checks=[Check("ledger_complete", False, 1, needs_drain=True), Check("no_negative_stock", True)],
        drained=False,
        drain_detail="1 order queued",
    )
    verdict = judge(truth, TOLD)
    assert verdict.invariants_held and not verdict.drained
    assert [c.name for c in verdict.not_judged] == ["lost", "ledger_complete"]
    assert "1 order queued" in verdict.not_judged[0].detail
    assert [c.name for c in verdict.checks] == ["oversold", "duplicate", "no_negative_stock"]


def test_the_exit_meaning_is_specific() -> None:
    assert exit_codes.meaning(2, failed=["oversold", "mine"]) == "invariant violated: oversold, mine"
    assert (
        exit_codes.meaning(3, invalid_because=["not drained: …", "cpu"])
        == "run invalid: not drained: … (and 1 more)"
    )
    assert exit_codes.meaning(0) == exit_codes.MEANING[0]
    assert "no oracle" in exit_codes.meaning(0, unjudged="no oracle")
    assert "invariants held" not in exit_codes.meaning(1, unjudged="no oracle")
    assert exit_codes.USAGE == 64 and exit_codes.USAGE not in (
        exit_codes.SLO_MISSED,
        exit_codes.INVARIANT_VIOLATED,
    )
