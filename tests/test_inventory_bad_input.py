"""Bad input changes nothing: every rejected call raises its typed exception (checked by
``code``) and leaves every key of the sale byte-for-byte as it was. The second half sends
bad ARGV straight to the Lua scripts, past the Python checks, to prove each script
validates before its first write."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from inventory_support import audit_sale, dump_sale, open_sale

from inventory import Cart, Hold, InvalidRequest, Inventory, InventoryError, Line, SaleKeys, _validate
from inventory._errors import (
    HOLD_NOT_FOUND,
    INSUFFICIENT_STOCK,
    INVALID,
    OK,
    SKU_EXISTS,
    UNKNOWN_SKU,
)
from inventory._validate import MAX_LINES, MAX_QTY, MAX_TTL_MS


@dataclass
class Sale:
    """A sale with some history, so "unchanged" covers every kind of key: two SKUs (one
    with a reserve pool and a per-user limit), a held, a paid and a cancelled hold."""

    inv: Inventory
    held: Hold
    paid: Hold
    cancelled: Hold


@pytest.fixture
async def sale(redis_url: str) -> AsyncIterator[Sale]:
    async with open_sale(redis_url, "bad") as inv:
        await inv.stock("phone", 10, reserve=2, limit_per_user=3, low_stock_line=2)
        await inv.stock("case", 5)
        held = await inv.reserve("alice", [("phone", 2), ("case", 1)], request_id="r-held")
        paid = await inv.reserve("bob", "phone", request_id="r-paid")
        await inv.confirm(paid.hold_id, user="bob")
        cancelled = await inv.reserve("carol", "case", request_id="r-cancelled")
        await inv.release(cancelled.hold_id)
        yield Sale(inv, held, paid, cancelled)


Call = Callable[[Sale], Awaitable[Any]]


def cart(lines: Any) -> Call:
    return lambda s: s.inv.reserve("dave", lines, request_id="r-new")


def qty(value: Any) -> Call:
    return cart([Line("phone", value)])


UNICODE = "\u00e9l\u00e8ve"
LONG = "x" * 65

CASES: dict[str, tuple[Call, str]] = {
    # quantities
    "qty zero": (qty(0), "invalid_quantity"),
    "qty negative": (qty(-1), "invalid_quantity"),
    "qty huge": (qty(10**18), "invalid_quantity"),
    "qty above the per-line maximum": (qty(MAX_QTY + 1), "invalid_quantity"),
    "qty float": (qty(1.5), "invalid_quantity"),
    "qty whole float": (qty(2.0), "invalid_quantity"),
    "qty nan": (qty(math.nan), "invalid_quantity"),
    "qty bool": (qty(True), "invalid_quantity"),
    "qty string": (qty("1"), "invalid_quantity"),
    "qty None": (qty(None), "invalid_quantity"),
    "qty in a tuple line": (cart([("phone", "2")]), "invalid_quantity"),
    # carts
    "unknown sku": (cart("tablet"), "unknown_sku"),
    "unknown sku after a good line": (cart([("case", 1), ("zzz", 1)]), "unknown_sku"),
    "empty cart": (cart([]), "invalid_request"),
    "duplicate lines": (cart([("phone", 1), ("phone", 1)]), "invalid_request"),
    "too many lines": (cart([(f"s{i}", 1) for i in range(MAX_LINES + 1)]), "invalid_request"),
    "endless cart": (cart(iter(lambda: ("phone", 1), None)), "invalid_request"),
    "cart is a number": (cart(5), "invalid_request"),
    "cart is None": (cart(None), "invalid_request"),
    "cart line is None": (cart([None]), "invalid_request"),
    "cart line has three parts": (cart([("phone", 1, 2)]), "invalid_request"),
    "cart line is a bare string": (cart(["phone"]), "invalid_request"),
    "sku not a string": (cart([(5, 1)]), "invalid_request"),
    "sku too long": (cart([("p" * 65, 1)]), "invalid_request"),
    "sku non-ASCII": (cart(UNICODE), "invalid_request"),
    "sku with a colon": (cart("phone:held"), "invalid_request"),
    # ids
    "user too long": (lambda s: s.inv.reserve(LONG, "phone", request_id="r-new"), "invalid_request"),
    "user non-ASCII": (lambda s: s.inv.reserve(UNICODE, "phone", request_id="r-new"), "invalid_request"),
    "user empty": (lambda s: s.inv.reserve("", "phone", request_id="r-new"), "invalid_request"),
    "user with a colon": (lambda s: s.inv.reserve("a:b", "phone", request_id="r-new"), "invalid_request"),
    "user not a string": (lambda s: s.inv.reserve(7, "phone", request_id="r-new"), "invalid_request"),
    "request id too long": (lambda s: s.inv.reserve("dave", "phone", request_id=LONG), "invalid_request"),
    "request id non-ASCII": (lambda s: s.inv.reserve("dave", "phone", request_id=UNICODE), "invalid_request"),
    "request id empty": (lambda s: s.inv.reserve("dave", "phone", request_id=""), "invalid_request"),
    "hold id too long": (lambda s: s.inv.confirm(s.inv.sale + "." + LONG), "invalid_request"),
    "hold id non-ASCII": (lambda s: s.inv.confirm(s.inv.sale + "." + UNICODE), "invalid_request"),
    "hold id without a sale": (lambda s: s.inv.release("abcdef"), "invalid_request"),
    "hold id of another sale": (lambda s: s.inv.confirm("other-sale.abcdef"), "invalid_request"),
    "hold id unknown": (lambda s: s.inv.confirm(s.inv.sale + ".abcdef"), "hold_not_found"),
    "hold read with a bad id": (lambda s: s.inv.hold(UNICODE), "invalid_request"),
    # hold TTLs
    "ttl zero": (lambda s: s.inv.reserve("dave", "phone", request_id="r-new", hold_ttl=0), "invalid_request"),
    "ttl negative": (
        lambda s: s.inv.reserve("dave", "phone", request_id="r-new", hold_ttl=-5),
        "invalid_request",
    ),
    "ttl nan": (
        lambda s: s.inv.reserve("dave", "phone", request_id="r-new", hold_ttl=math.nan),
        "invalid_request",
    ),
    "ttl inf": (
        lambda s: s.inv.reserve("dave", "phone", request_id="r-new", hold_ttl=math.inf),
        "invalid_request",
    ),
    "ttl bool": (
        lambda s: s.inv.reserve("dave", "phone", request_id="r-new", hold_ttl=True),
        "invalid_request",
    ),
    "ttl string": (
        lambda s: s.inv.reserve("dave", "phone", request_id="r-new", hold_ttl="30"),
        "invalid_request",
    ),
    "ttl over a week": (
        lambda s: s.inv.reserve("dave", "phone", request_id="r-new", hold_ttl=timedelta(days=8)),
        "invalid_request",
    ),
    # a request id reused with another payload
    "request id reused, other cart": (
        lambda s: s.inv.reserve("alice", "phone", request_id="r-held"),
        "request_conflict",
    ),
    "request id reused, other qty": (
        lambda s: s.inv.reserve("alice", [("phone", 1), ("case", 1)], request_id="r-held"),
        "request_conflict",
    ),
    # Another buyer's request id is no clue: past the limit, the answer is about the limit.
    "another buyer's request id, over the limit": (
        lambda s: s.inv.reserve("mallory", [("phone", 4)], request_id="r-held"),
        "limit_exceeded",
    ),
    "request id of a cancelled hold, other cart": (
        lambda s: s.inv.reserve("carol", "phone", request_id="r-cancelled"),
        "request_conflict",
    ),
    # refusals of valid requests change nothing either
    "sold out": (lambda s: s.inv.reserve("dave", [("case", 5)], request_id="r-new"), "sold_out"),
    "sold out on the second line": (
        lambda s: s.inv.reserve("dave", [("phone", 1), ("case", 5)], request_id="r-new"),
        "sold_out",
    ),
    "over the per-user limit": (
        lambda s: s.inv.reserve("alice", [("phone", 2)], request_id="r-new"),
        "limit_exceeded",
    ),
    "confirm a cancelled hold": (lambda s: s.inv.confirm(s.cancelled.hold_id), "hold_cancelled"),
    "release a paid hold": (lambda s: s.inv.release(s.paid.hold_id), "hold_paid"),
    "confirm another user's hold": (lambda s: s.inv.confirm(s.held.hold_id, user="bob"), "hold_not_found"),
    "release another user's hold": (lambda s: s.inv.release(s.held.hold_id, user="bob"), "hold_not_found"),
    "confirm as a bad user id": (lambda s: s.inv.confirm(s.held.hold_id, user=UNICODE), "invalid_request"),
    # stock changes
    "stock an existing sku": (lambda s: s.inv.stock("phone", 5), "sku_exists"),
    "stock negative": (lambda s: s.inv.stock("new", -1), "invalid_quantity"),
    "stock float": (lambda s: s.inv.stock("new", 2.5), "invalid_quantity"),
    "stock huge": (lambda s: s.inv.stock("new", 10**10), "invalid_quantity"),
    "stock reserve over total": (lambda s: s.inv.stock("new", 5, reserve=6), "invalid_quantity"),
    "stock negative limit": (lambda s: s.inv.stock("new", 5, limit_per_user=-1), "invalid_quantity"),
    "stock bad sku": (lambda s: s.inv.stock(UNICODE, 5), "invalid_request"),
    "adjust below zero": (lambda s: s.inv.adjust("phone", -6), "insufficient_stock"),
    "adjust zero": (lambda s: s.inv.adjust("phone", 0), "invalid_request"),
    "adjust float": (lambda s: s.inv.adjust("phone", 1.5), "invalid_request"),
    "adjust bool": (lambda s: s.inv.adjust("phone", True), "invalid_request"),
    "adjust huge": (lambda s: s.inv.adjust("phone", 10**10), "invalid_request"),
    "adjust unknown sku": (lambda s: s.inv.adjust("tablet", 1), "unknown_sku"),
    "restock zero": (lambda s: s.inv.restock("phone", 0), "invalid_quantity"),
    "restock negative": (lambda s: s.inv.restock("phone", -3), "invalid_quantity"),
    "restock unknown sku": (lambda s: s.inv.restock("tablet", 3), "unknown_sku"),
    "release more reserve than exists": (lambda s: s.inv.release_reserve("phone", 3), "insufficient_stock"),
    "release reserve of a sku without a pool": (
        lambda s: s.inv.release_reserve("case", 1),
        "insufficient_stock",
    ),
    "release reserve zero": (lambda s: s.inv.release_reserve("phone", 0), "invalid_quantity"),
    "release reserve unknown sku": (lambda s: s.inv.release_reserve("tablet"), "unknown_sku"),
    "sweep limit zero": (lambda s: s.inv.expire_due(limit=0), "invalid_quantity"),
    "sweep limit too big": (lambda s: s.inv.expire_due(limit=1001), "invalid_quantity"),
    "snapshot of a bad sku": (lambda s: s.inv.snapshot(UNICODE), "invalid_request"),
}


@pytest.mark.parametrize("case", CASES)
async def test_rejected_call_raises_its_code_and_changes_nothing(sale: Sale, case: str) -> None:
    call, code = CASES[case]
    before = await dump_sale(sale.inv.redis, sale.inv.keys)
    assert len(before) == 6, "the fixture's sale should have all six keys"
    with pytest.raises(InventoryError) as refused:
        await call(sale)
    assert refused.value.code == code, refused.value
    assert str(refused.value), "an error says what is wrong"
    assert await dump_sale(sale.inv.redis, sale.inv.keys) == before


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(InventoryError) as bad_sale:
        Inventory(object(), "Bad Sale")
    assert bad_sale.value.code == "invalid_request"
    with pytest.raises(InventoryError) as bad_ttl:
        Inventory(object(), "s", hold_ttl=math.nan)
    assert bad_ttl.value.code == "invalid_request"
    with pytest.raises(ValueError, match="max_batch"):
        Inventory(object(), "s", max_batch=0)


# ------------------------------------------------- bad ARGV straight to the scripts


def group(
    request_id: str = "q1", hold_id: str | None = None, user: str = "dave", ttl: Any = 60_000, *lines: Any
) -> list[Any]:
    """One reserve request as the script reads it; lines are (sku, qty) pairs."""
    flat = [x for line in (lines or (("phone", 1),)) for x in line]
    return [request_id, hold_id or f"h-{request_id}", user, ttl, len(lines or (1,)), *flat]


def batch(*groups: list[Any]) -> list[Any]:
    return [len(groups), *[x for g in groups for x in g]]


RESERVE_ARGV: dict[str, tuple[list[Any], str]] = {
    **{
        f"qty {q!r}": (batch(group("q1", None, "dave", 60_000, ("phone", q))), "invalid_quantity")
        for q in ("abc", "0", "-1", "1.5", "inf", "-inf", "nan", "1e20", str(MAX_QTY + 1), "")
    },
    **{
        f"ttl {t!r}": (batch(group("q1", None, "dave", t)), "bad_ttl")
        for t in ("abc", "0", "-5", "1.5", "inf", "nan", str(MAX_TTL_MS + 1), "")
    },
    "duplicate line": (
        batch(group("q1", None, "dave", 60_000, ("phone", 1), ("phone", 1))),
        "duplicate_line",
    ),
    "hold id taken": (batch(group("q1", "HELD", "dave")), "hold_id_taken"),
    **{f"count {n!r}": ([n, *group()], "bad_batch") for n in ("abc", "0", "-1", "1.5", "1001", "2")},
    "trailing argument": ([*batch(group()), "extra"], "bad_batch"),
    "line count zero": ([1, "q1", "h1", "dave", 60_000, 0], "bad_batch"),
    "line count too big": (
        [1, "q1", "h1", "dave", 60_000, MAX_LINES + 1, *(["phone", 1] * (MAX_LINES + 1))],
        "bad_batch",
    ),
    "line count not a number": ([1, "q1", "h1", "dave", 60_000, "x", "phone", 1], "bad_batch"),
    "empty request id": (batch(group("")), "bad_batch"),
    "empty user": (batch(group("q1", None, "")), "bad_batch"),
    # Nor users: "r:<user>:<request id>" must name one buyer's record.
    "user with ':'": (batch(group("q1", None, "r:dave")), "bad_batch"),
    "no arguments": ([], "bad_batch"),
    # The "validate the whole batch first" case: the first request is good and would
    # write a hold; the second is malformed. Nothing may be written.
    "good request then malformed one": (
        [2, *group("q1"), "q2", "h2", "dave", 60_000, 3, "phone", 1],
        "bad_batch",
    ),
    # Request ids cannot contain ':' ("op:<id>" records of stock changes share the hash).
    "request id of a stock operation": (batch(group("OPID")), "bad_batch"),
    "good request then a stock operation's id": (batch(group("q1"), group("OPID")), "bad_batch"),
    # The event entry packs each hold's user, lines, request id and deadline with spaces,
    # under a field named by its hold id beside 'type' and 'at' (inventory/_events.py).
    "space in a hold id": (batch(group("q1", "h 1")), "bad_batch"),
    "space in a user": (batch(group("q1", None, "da ve")), "bad_batch"),
    "space in a request id": (batch(group("q 1")), "bad_batch"),
    "space in a SKU": (batch(group("q1", None, "dave", 60_000, ("pho ne", 1))), "bad_batch"),
    "good request then one with a space": (batch(group("q1"), group("q2", "h 2")), "bad_batch"),
    "hold id 'type'": (batch(group("q1", "type")), "bad_batch"),
    "hold id 'at'": (batch(group("q1"), group("q2", "at")), "bad_batch"),
}


async def scripted(inv: Inventory, name: str, args: list[Any]) -> list[Any]:
    keys = {
        "reserve": inv.keys.for_reserve(),
        "confirm": inv.keys.for_hold_close(),
        "release": inv.keys.for_hold_close(),
        "expire": inv.keys.for_hold_close(),
    }.get(name, inv.keys.for_stock_change())
    reply: list[Any] = await inv._scripts[name](keys=keys, args=args)
    return reply


def codes(replies: list[Any]) -> list[int]:
    """Each request's result code in a reserve reply (a hold made is answered by its deadline)."""
    return [OK if isinstance(reply, int) else reply[0] for reply in replies]


@pytest.mark.parametrize("case", RESERVE_ARGV)
async def test_reserve_script_refuses_bad_argv_before_writing(sale: Sale, case: str) -> None:
    argv, reason = RESERVE_ARGV[case]
    op_id = next(f for f in await sale.inv.redis.hkeys(sale.inv.keys.requests) if f.startswith(b"op:"))
    argv = [
        {"HELD": sale.held.hold_id, "OPID": op_id.decode()}.get(a, a) if isinstance(a, str) else a
        for a in argv
    ]
    before = await dump_sale(sale.inv.redis, sale.inv.keys)
    reply = await scripted(sale.inv, "reserve", argv)
    assert len(reply) == 1 and reply[0][0] == INVALID and reply[0][1] == reason.encode(), reply
    assert await dump_sale(sale.inv.redis, sale.inv.keys) == before


async def test_reserve_script_decides_each_request_of_a_batch_on_its_own(sale: Sale) -> None:
    """The other side of the case above: a well-formed batch with one invalid request
    writes the good one and refuses only the bad one."""
    reply = await scripted(sale.inv, "reserve", batch(group("q1"), group("q2", None, "dave", "abc")))
    assert codes(reply) == [OK, INVALID]
    assert (await sale.inv.snapshot("phone")).held == 2 + 1  # type: ignore[union-attr]  # alice 2, dave 1


async def test_a_damaged_request_record_is_refused_not_raised(sale: Sale) -> None:
    """reserve.lua writes SKU counters once, at the end of the batch: a Lua error in a
    later request would leave the earlier requests' holds without their counters. A
    request record that does not decode, or names a hold that is gone, is refused."""
    inv = sale.inv
    gone, garbled = SaleKeys.request_field("dave", "gone"), SaleKeys.request_field("dave", "garbled")
    await inv.redis.hset(inv.keys.requests, gone, '{"h":"' + inv.sale + '.gone","f":"dave|phone:1"}')
    await inv.redis.hset(inv.keys.requests, garbled, "not json")
    reply = await scripted(inv, "reserve", batch(group("q1"), group("gone"), group("garbled"), group("q2")))
    assert codes(reply) == [OK, INVALID, INVALID, OK]
    assert reply[1][1] == reply[2][1] == b"bad_request_record"
    await inv.redis.hdel(inv.keys.requests, gone, garbled)
    assert await audit_sale(inv.redis, inv.keys) == []


BAD_NUMBERS = ("abc", "-1", "1.5", "inf", "-inf", "nan", "1e20", "")
NOT_A_DELTA = tuple(v for v in BAD_NUMBERS if v != "-1")

STOCK_CHANGE_ARGV: dict[str, tuple[str, list[Any], int, bytes | None]] = {
    **{
        f"stock {field} {v!r}": (
            "stock",
            [
                "new",
                *[
                    v if f == field else d
                    for f, d in zip(("total", "reserve", "limit", "low"), (10, 0, 0, 0))
                ],
                "op",
            ],
            INVALID,
            b"bad_number",
        )
        for field in ("total", "reserve", "limit", "low")
        for v in BAD_NUMBERS
    },
    "stock reserve over total": ("stock", ["new", 5, 6, 0, 0, "op"], INVALID, b"reserve_exceeds_total"),
    "stock without an operation id": ("stock", ["new", 5, 0, 0, 0], INVALID, b"bad_request"),
    "stock an existing sku": ("stock", ["phone", 5, 0, 0, 0, "op"], SKU_EXISTS, None),
    **{f"adjust {v!r}": ("adjust", ["phone", v, "op"], INVALID, b"bad_delta") for v in (*NOT_A_DELTA, "0")},
    "adjust below zero": ("adjust", ["phone", -6, "op"], INSUFFICIENT_STOCK, b"phone"),
    "adjust unknown sku": ("adjust", ["tablet", 1, "op"], UNKNOWN_SKU, b"tablet"),
    "adjust without an operation id": ("adjust", ["phone", 1], INVALID, b"bad_request"),
    **{
        f"release_reserve {v!r}": ("release_reserve", ["phone", v, "op"], INVALID, b"bad_units")
        for v in BAD_NUMBERS
    },
    "release_reserve more than the pool": (
        "release_reserve",
        ["phone", 3, "op"],
        INSUFFICIENT_STOCK,
        b"phone",
    ),
    "release_reserve unknown sku": ("release_reserve", ["tablet", 1, "op"], UNKNOWN_SKU, b"tablet"),
    **{f"expire limit {v!r}": ("expire", [v], INVALID, b"bad_limit") for v in (*BAD_NUMBERS, "0", "1001")},
    "confirm unknown hold": ("confirm", ["nope", ""], HOLD_NOT_FOUND, None),
    "release unknown hold": ("release", ["nope", ""], HOLD_NOT_FOUND, None),
    "confirm another user's hold": ("confirm", ["HELD", "bob"], HOLD_NOT_FOUND, None),
    "release another user's hold": ("release", ["HELD", "bob"], HOLD_NOT_FOUND, None),
}


@pytest.mark.parametrize("case", STOCK_CHANGE_ARGV)
async def test_other_scripts_refuse_bad_argv_before_writing(sale: Sale, case: str) -> None:
    name, argv, code, detail = STOCK_CHANGE_ARGV[case]
    argv = [sale.held.hold_id if a == "HELD" else a for a in argv]
    before = await dump_sale(sale.inv.redis, sale.inv.keys)
    reply = await scripted(sale.inv, name, argv)
    assert reply[0] == code, reply
    if detail is not None:
        assert reply[1] == detail, reply
    assert await dump_sale(sale.inv.redis, sale.inv.keys) == before


@pytest.mark.parametrize("bad", ["", "has space", "x" * 65, "ü"])
def test_a_one_sku_cart_is_checked_every_time(bad: str) -> None:
    """One-unit carts are kept per SKU (the usual cart of a surge): a refused SKU is
    refused again, never remembered as a cart, and a good one is the same cart each time."""
    for _ in range(2):
        with pytest.raises(InvalidRequest):
            Inventory.check_reserve("alice", bad, "r1")
    assert Inventory.check_reserve("alice", "phone", "r1") == (Line("phone", 1),)
    assert Inventory.check_reserve("bob", "phone", "r2") is Inventory.check_reserve("alice", "phone", "r1")


def test_a_checked_cart_is_a_cart_only_the_check_makes() -> None:
    """check_reserve hands back a Cart, which reserve trusts without checking it again
    (the service checks once): so nothing but the check can make one."""
    cart = Inventory.check_reserve("alice", [Line("tv", 2), ("phone", 1)], "r1")
    assert isinstance(cart, Cart)
    assert cart == (Line("phone", 1), Line("tv", 2))
    assert Inventory.check_reserve("alice", cart, "r2") is cart
    assert isinstance(Inventory.check_reserve("alice", "phone", "r1"), Cart)
    with pytest.raises(TypeError):
        Cart([Line("", -5)])  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Cart.__new__(Cart, [Line("", -5)])  # type: ignore[call-arg]


def test_a_copied_cart_is_checked_again() -> None:
    """A pickled or copied cart comes back as a plain tuple: trusted only as made."""
    import copy
    import pickle

    cart = Inventory.check_reserve("alice", [Line("tv", 2)], "r1")
    for again in (copy.copy(cart), copy.deepcopy(cart), pickle.loads(pickle.dumps(cart))):
        assert again == cart and type(again) is tuple


async def test_reserve_checks_what_is_not_a_checked_cart(sale: Sale) -> None:
    with pytest.raises(InvalidRequest):
        await sale.inv.reserve("alice", (Line("phone", 0),), request_id="r-bad")
    hold = await sale.inv.reserve(
        "alice", Inventory.check_reserve("alice", "phone", "r-ok"), request_id="r-ok"
    )
    assert hold.lines == (Line("phone", 1),)


@pytest.mark.parametrize("bad", ["", "has space", "has:colon", "x" * 65, "ü", 7, None, ["a"]])
def test_an_id_is_refused_every_time_whatever_passed_before_it(bad: object) -> None:
    """The last ids that passed are remembered (the service and reserve check the same
    ids, one after the other), so a bad id must never be let through by what the good ones
    left: first, after good ones, and again."""
    for _ in range(2):
        with pytest.raises(InvalidRequest):
            _validate.ident(bad, "request_id")
    for good in ("alice", "r-1.x@y_z", "A" * 64):
        assert _validate.ident(good, "user") == good
        assert _validate.ident(good, "user") == good
        with pytest.raises(InvalidRequest):
            _validate.ident(bad, "request_id")

    class Pretender(str):  # a str whose text is bad, however it compares
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    with pytest.raises(InvalidRequest):
        _validate.ident(Pretender("has space"), "user")
