"""The waiting room's checks in the drill's oracle (``loadtests.room``), on small records and
histories written by hand: each check passes on a room that kept its rules and fails on one
planted violation of them. (A rehearsal behind a real room, and the same checks failing on
its tampered record: tests/test_loadtests_room_rehearsal.py.)"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

import inventory
from loadtests.history import Operation
from loadtests.room import RoomBuyer, RoomRecord, replay_shuffle, room_checks

T0 = 1_000_000.0  # seconds; the record's times are ms
PHONE, CASE = "phone", "case"
_ops = itertools.count()


def op(f: str, invoke: float, complete: float | None = None, *, type: str = "ok", **fields: Any) -> Operation:
    value = fields.pop("value", {})
    return Operation(
        op=next(_ops),
        proc="local",
        visit=f"v{next(_ops)}",
        persona=fields.pop("persona", "buyer"),
        f=f,
        intended=invoke,
        invoke=invoke,
        complete=invoke + 0.01 if complete is None else complete,
        type=type,  # type: ignore[arg-type]
        status=fields.pop("status", 200),
        value=value,
        **fields,
    )


def answer(account: str, at: float, state: str, sku: str = PHONE, poll_after_ms: int = 500) -> Operation:
    return op(
        "room_poll",
        at,
        item=sku,
        value={"account": account, "skus": [sku], "state": state, "poll_after_ms": poll_after_ms},
    )


def acknowledged(account: str, sku: str, order: str, at: float, ticket: str = "own") -> Operation:
    """An order the service acknowledged (201); its request id is ``r-<order without "o-">``."""
    return op(
        "order",
        at,
        order=order,
        item=sku,
        units=1,
        key="r-" + order.removeprefix("o-"),
        status=201,
        value={"account": account, "ticket": ticket, "pay_by_ms": ms(at + 60)},
    )


def ms(t: float) -> int:
    return int(round(t * 1000))


class Scene:
    """A room that kept its rules: three buyers joined before T0 (shuffled with seed 77), two
    after; one phone in stock, won by the first in the queue, who pays 2 s after T0; the
    rest of the phone queue is told "sold out" 0.3 s later; a case buyer buys a case."""

    def __init__(self) -> None:
        self.pre = ["p1", "p2", "p3"]
        shuffled = replay_shuffle(self.pre, 77)
        place = {b: i + 1 for i, b in enumerate(shuffled)}
        first = shuffled[0]
        buyers = {
            b: RoomBuyer(
                b, "sold_out", (PHONE,), ms(T0 - 5 + i), place[b], told_ms=ms(T0 + 2.3), told_after_ms=50
            )
            for i, b in enumerate(self.pre)
        }
        buyers[first] = RoomBuyer(
            first,
            "used",
            (PHONE,),
            ms(T0 - 5),
            place[first],
            ms(T0 + 0.01),
            ms(T0 + 120),
            ms(T0 + 0.5),
            "r-win",
        )
        buyers["late1"] = RoomBuyer(
            "late1", "sold_out", (PHONE,), ms(T0 + 1), 4, told_ms=ms(T0 + 2.3), told_after_ms=40
        )
        buyers["c1"] = RoomBuyer(
            "c1", "used", (CASE,), ms(T0 + 1.1), 5, ms(T0 + 1.1), ms(T0 + 121), ms(T0 + 1.2), "r-c1"
        )
        self.first = first
        self.record = RoomRecord(
            sale="d11",
            opens_at_ms=ms(T0),
            seed=77,
            oversubscribe=1.0,
            rate_per_s=10.0,
            shuffled=True,
            pre_queue=tuple(self.pre),
            buyers=buyers,
            counters={"joined": 5, "admitted": 2, "used": 2, "told_sold_out": 3},
        )
        waiting = [b for b in self.pre if b != first] + ["late1"]
        self.ops: list[Operation] = [
            *(answer(b, T0 - 4, "pre") for b in self.pre),
            answer(first, T0 + 0.1, "admitted"),
            *(answer(b, T0 + 1.5, "waiting") for b in waiting),
            acknowledged(first, PHONE, "o-win", T0 + 0.5),
            op("pay", T0 + 2.0, T0 + 2.05, value={"paid_order": "o-win"}),
            *(answer(b, T0 + 2.25, "sold_out") for b in waiting),
            answer("c1", T0 + 1.15, "admitted", sku=CASE),
            acknowledged("c1", CASE, "o-c1", T0 + 1.2),
            op(
                "order",
                T0 + 1.3,
                type="fail",
                status=401,
                code="ticket_required",
                key="r-bot",
                persona="bot",
                value={"account": "bot-1", "ticket": "none"},
            ),
        ]

    def judge(
        self, record: RoomRecord | None = None, ops: Sequence[Operation] | None = None, **kw: Any
    ) -> dict[str, Any]:
        checks, figures = room_checks(
            record or self.record,
            self.ops if ops is None else ops,
            stocked={PHONE: 1, CASE: 10},
            sold_out={PHONE},
            **kw,
        )
        return {"checks": {c.name: c for c in checks}, "figures": figures}

    def buyer(self, account: str, **changes: Any) -> RoomRecord:
        return replace(
            self.record,
            buyers={**self.record.buyers, account: replace(self.record.buyers[account], **changes)},
        )


@pytest.fixture
def scene() -> Scene:
    return Scene()


def failed(result: dict[str, Any]) -> set[str]:
    return {name for name, c in result["checks"].items() if not c.passed}


def test_the_replayed_shuffle_is_the_rooms() -> None:
    """The documented algorithm, written again in loadtests (HTTP only), gives what the
    room's Lua gives (``inventory.replay_shuffle`` mirrors the script, tested there)."""
    rng = random.Random(7)
    for n in (0, 1, 2, 3, 10, 257):
        buyers = [f"b{i}" for i in range(n)]
        for _ in range(20):
            seed = rng.randrange(1, 2**31 - 1)
            assert replay_shuffle(buyers, seed) == inventory.replay_shuffle(buyers, seed)


def test_a_room_that_kept_its_rules_passes_every_check(scene: Scene) -> None:
    result = scene.judge()
    assert failed(result) == set(), {n: c.detail for n, c in result["checks"].items()}
    assert all(c.observed == 0 for c in result["checks"].values())
    f = result["figures"]
    assert f["told_after_sell_out_ms"]["count"] == 3 and f["told_after_sell_out_ms"]["max"] <= 300
    assert f["pre_queue"] == 3 and f["wait_ms"]["count"] == 2 and f["queue_max"] >= 3
    assert f["skip_attempts"] == {"none": {"401:ticket_required": 1}}
    assert f["sold_out_at_s_from_t0"] == {PHONE: 2.0}


def test_room_shuffle_fails_on_positions_that_are_not_the_replayed_shuffle(scene: Scene) -> None:
    a, b = (x for x in scene.pre if x != scene.first)
    pa, pb = scene.record.buyers[a].position, scene.record.buyers[b].position
    swapped = replace(
        scene.record,
        buyers={
            **scene.record.buyers,
            a: replace(scene.record.buyers[a], position=pb),
            b: replace(scene.record.buyers[b], position=pa),
        },
    )
    assert failed(scene.judge(swapped)) == {"room_shuffle"}
    # Another seed recorded than the one that shuffled: the same.
    assert "room_shuffle" in failed(scene.judge(replace(scene.record, seed=78)))


def test_room_shuffle_fails_on_a_pre_t0_joiner_left_out_or_no_shuffle(scene: Scene) -> None:
    dropped = replace(scene.record, pre_queue=scene.record.pre_queue[1:])
    assert "room_shuffle" in failed(scene.judge(dropped))
    assert "room_shuffle" in failed(scene.judge(replace(scene.record, shuffled=False)))
    nobody = scene.judge(
        replace(scene.record, pre_queue=()), [o for o in scene.ops if o.value.get("state") != "pre"]
    )
    assert nobody["checks"]["room_shuffle"].observed is None  # not judged, never "passed"


def test_room_fifo_fails_when_a_buyer_is_admitted_past_one_ahead(scene: Scene) -> None:
    # late1 (place 4) admitted while a buyer ahead of it (told only at T0 + 2.3 s) waited.
    jumped = scene.buyer("late1", state="used", admitted_ms=ms(T0 + 1.2), told_ms=None, used_ms=ms(T0 + 1.3))
    assert "room_fifo" in failed(scene.judge(jumped))


def test_room_fifo_fails_when_places_do_not_follow_arrival(scene: Scene) -> None:
    early_but_behind = scene.buyer("c1", joined_ms=ms(T0 + 0.9))  # joined before late1, placed after
    assert failed(scene.judge(early_but_behind)) == {"room_fifo"}


def test_room_tickets_fails_on_an_order_without_the_buyers_own_ticket(scene: Scene) -> None:
    bypass = acknowledged("bot-1", CASE, "o-bot", T0 + 1.4, ticket="forged")
    assert "room_tickets" in failed(scene.judge(ops=[*scene.ops, bypass]))
    # An own ticket the room never saw spent on that request: the same.
    unspent = scene.buyer("c1", request_id="r-other")
    assert failed(scene.judge(unspent)) == {"room_tickets"}


def test_room_admission_bound_fails_on_more_tickets_than_units(scene: Scene) -> None:
    # A second phone ticket out at once, while the one phone was still available.
    extra = RoomBuyer("x", "used", (PHONE,), ms(T0 + 0.2), 6, ms(T0 + 0.2), ms(T0 + 120), ms(T0 + 0.6), "r-x")
    over = replace(scene.record, buyers={**scene.record.buyers, "x": extra})
    assert "room_admission_bound" in failed(scene.judge(over))
    # ...which twice the oversubscription allows.
    assert "room_admission_bound" not in failed(scene.judge(replace(over, oversubscribe=2.0)))


def test_room_admission_bound_fails_when_an_admitted_buyer_finds_it_sold_out(scene: Scene) -> None:
    refused = op(
        "order",
        T0 + 2.4,
        type="fail",
        status=409,
        code="sold_out",
        key="r-y",
        value={"account": "y", "ticket": "own"},
    )
    assert failed(scene.judge(ops=[*scene.ops, refused])) == {"room_admission_bound"}
    oversubscribed = replace(scene.record, oversubscribe=1.5)
    assert "room_admission_bound" not in failed(scene.judge(oversubscribed, [*scene.ops, refused]))


def test_room_told_fails_when_a_waiting_buyer_hears_late(scene: Scene) -> None:
    late = [
        o for o in scene.ops if not (o.value.get("account") == "late1" and o.value.get("state") == "sold_out")
    ]
    late.append(answer("late1", T0 + 3.5, "sold_out"))
    result = scene.judge(ops=late)
    assert failed(result) == {"room_told"}
    assert result["figures"]["told_after_sell_out_ms"]["max"] >= 1500
    assert "room_told" not in failed(scene.judge(ops=late, told_within_s=2.0))


def test_room_told_fails_when_a_poll_after_the_sell_out_says_waiting(scene: Scene) -> None:
    stale = [*scene.ops, answer("late1", T0 + 2.2, "waiting")]
    assert "room_told" in failed(scene.judge(ops=stale))


def test_room_told_fails_on_a_buyer_told_to_come_back_too_late(scene: Scene) -> None:
    """A buyer the run ended on before their next poll is "not reached" — unless the room
    had told them to come back later than the limit after the sell-out."""
    gone = [
        o for o in scene.ops if not (o.value.get("account") == "late1" and o.value.get("state") == "sold_out")
    ]
    assert "room_told" not in failed(scene.judge(ops=gone))
    assert scene.judge(ops=gone)["figures"]["not_reached"] == 1
    slow = [o for o in gone if not (o.value.get("account") == "late1" and o.value.get("state") == "waiting")]
    slow.append(answer("late1", T0 + 1.5, "waiting", poll_after_ms=4000))
    assert "room_told" in failed(scene.judge(ops=slow))


def test_room_told_fails_on_a_sold_out_told_while_units_were_left(scene: Scene) -> None:
    early = [*scene.ops, answer("p9", T0 + 1.0, "sold_out")]  # before the last phone was paid
    assert "room_told" in failed(scene.judge(ops=early))
    wrong = [*scene.ops, answer("c9", T0 + 1.0, "sold_out", sku=CASE)]  # cases were never sold out
    assert "room_told" in failed(scene.judge(ops=wrong))


def test_room_told_measures_from_the_exact_sell_out_when_the_record_has_it(scene: Scene) -> None:
    """From the history alone the sell-out is when the last payment was sent (T0 + 2 s): an
    upper bound of the delay. The service's record knows when it was paid (here T0 + 2.2 s)."""
    assert scene.judge()["figures"]["told_after_sell_out_ms"]["max"] >= 250
    exact = replace(scene.record, sold_out_at_ms={PHONE: ms(T0 + 2.2)})
    result = scene.judge(exact)
    assert result["figures"]["told_after_sell_out_ms"]["max"] <= 60
    assert result["figures"]["sold_out_at_s_from_t0"] == {PHONE: 2.2}
    # A buyer told before the recorded sell-out was told wrongly.
    assert "room_told" in failed(scene.judge(replace(scene.record, sold_out_at_ms={PHONE: ms(T0 + 2.5)})))
