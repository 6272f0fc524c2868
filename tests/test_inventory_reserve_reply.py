"""The reserve script's reply, one element per request of a batch: a hold the call made
is answered by its deadline alone (an integer: the client sent its id and knows its
state, and its creation time is the deadline less the TTL it sent), everything else by
an array whose first element is a result code. ``Inventory.reserve`` is the only reader;
a batch mixing every kind of outcome must come back to each caller as its own."""

from __future__ import annotations

import asyncio

from inventory_support import audit_sale, open_sale

from inventory import Hold, HoldState, LimitExceeded, RequestConflict, SoldOut, UnknownSku
from inventory._errors import INVALID, LIMIT_EXCEEDED, REPLAYED, REQUEST_CONFLICT, SOLD_OUT, UNKNOWN_SKU
from inventory._scripts import script_source

TTL_MS = 60_000


def group(request_id: str, hold_id: str, user: str, *lines: tuple[str, int]) -> list[object]:
    flat: list[object] = [request_id, hold_id, user, TTL_MS, len(lines)]
    for sku, qty in lines:
        flat += [sku, qty]
    return flat


async def test_each_outcome_of_a_mixed_batch_has_its_own_reply_shape(redis_url: str) -> None:
    async with open_sale(redis_url, "reply") as inv:
        await inv.stock("phone", 10, limit_per_user=2)
        await inv.stock("case", 1)
        earlier = await inv.reserve("carol", "phone", request_id="old")
        reserve = inv.redis.register_script(script_source("reserve"))
        s = inv.sale
        groups = [
            group("a", f"{s}.a", "alice", ("phone", 1)),  # made
            group("a", f"{s}.a2", "alice", ("phone", 1)),  # the same request again, in the batch
            group("old", f"{s}.o", "carol", ("phone", 1)),  # replay of a stored request
            group("b", f"{s}.b", "bob", ("phone", 3)),  # over the limit
            group("c", f"{s}.c", "bob", ("case", 2)),  # sold out: one unit left
            group("d", f"{s}.d", "dave", ("tablet", 1)),  # no such SKU
            group("a", f"{s}.x", "alice", ("phone", 2)),  # alice's "a" with another cart
            group("e", f"{s}.e", "erin", ("phone", 0)),  # invalid quantity
            group("f", f"{s}.f", "frank", ("case", 1)),  # made: the last unit
        ]
        argv: list[object] = [len(groups)]
        for g in groups:
            argv += g
        replies = await reserve(keys=inv.keys.for_reserve(), args=argv)
        assert len(replies) == len(groups)
        made, again, stored, over, sold_out, unknown, conflict, invalid, last = replies
        assert isinstance(made, int) and isinstance(last, int)
        hold_a, hold_f = await inv.hold(f"{s}.a"), await inv.hold(f"{s}.f")
        assert hold_a is not None and hold_f is not None
        assert (made, last) == (hold_a.deadline_ms, hold_f.deadline_ms)
        assert hold_a.deadline_ms - hold_a.created_ms == TTL_MS
        assert [int(again[0]), again[1], int(again[2]), again[3]] == [
            REPLAYED,
            f"{s}.a".encode(),
            made,
            b"held",
        ]
        assert [int(stored[0]), stored[1], int(stored[2]), stored[3], int(stored[4])] == [
            REPLAYED,
            earlier.hold_id.encode(),
            earlier.deadline_ms,
            b"held",
            earlier.created_ms,
        ]
        assert [int(over[0]), over[1], int(over[2]), int(over[3])] == [LIMIT_EXCEEDED, b"phone", 2, 0]
        assert [int(sold_out[0]), sold_out[1], int(sold_out[2])] == [SOLD_OUT, b"case", 1]
        assert [int(unknown[0]), unknown[1]] == [UNKNOWN_SKU, b"tablet"]
        assert [int(conflict[0]), conflict[1]] == [REQUEST_CONFLICT, f"{s}.a".encode()]
        assert [int(invalid[0]), invalid[1]] == [INVALID, b"invalid_quantity"]
        assert await audit_sale(inv.redis, inv.keys) == []


async def test_callers_of_one_coalesced_batch_each_get_their_own_outcome(redis_url: str) -> None:
    async with open_sale(redis_url, "replyc") as inv:
        await inv.stock("phone", 5, limit_per_user=1)
        await inv.stock("case", 5)
        await inv.stock("cable", 1)
        earlier = await inv.reserve("carol", "case", request_id="old")
        results = await asyncio.gather(
            inv.reserve("alice", "phone", request_id="a"),
            inv.reserve("alice", "phone", request_id="a"),
            inv.reserve("carol", "case", request_id="old"),
            inv.reserve("alice", "case", request_id="a"),
            inv.reserve("bob", [("phone", 2)], request_id="b"),
            inv.reserve("dave", "phone", request_id="d", hold_ttl=5),
            inv.reserve("erin", [("cable", 2)], request_id="e"),
            inv.reserve("erin", [("case", 1), ("tablet", 1)], request_id="t"),
            return_exceptions=True,
        )
        made, again, stored, conflict, over, dave, sold_out, unknown = results
        assert isinstance(made, Hold) and isinstance(dave, Hold)
        assert (made.replayed, made.state, made.user, made.request_id) == (
            False,
            HoldState.HELD,
            "alice",
            "a",
        )
        assert made == await inv.hold(made.hold_id)
        assert dave.deadline_ms - dave.created_ms == 5000 and dave == await inv.hold(dave.hold_id)
        assert isinstance(again, Hold) and again.replayed
        assert (again.hold_id, again.deadline_ms, again.state) == (
            made.hold_id,
            made.deadline_ms,
            HoldState.HELD,
        )
        assert isinstance(stored, Hold) and stored.replayed
        assert (stored.hold_id, stored.deadline_ms, stored.created_ms) == (
            earlier.hold_id,
            earlier.deadline_ms,
            earlier.created_ms,
        )
        assert isinstance(conflict, RequestConflict) and conflict.details["hold_id"] == made.hold_id
        assert isinstance(over, LimitExceeded)
        assert isinstance(sold_out, SoldOut)
        assert isinstance(unknown, UnknownSku)
        assert await audit_sale(inv.redis, inv.keys) == []
