"""The inventory package's public surface: what it exports, what it imports, the Lua
scripts' headers and codes agreeing with the Python side, and the basic behaviour of
every call against a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
from datetime import timedelta
from importlib import resources
from typing import Any

import pytest
from inventory_support import audit_sale, events, open_sale

import inventory
from inventory import _errors, _validate
from inventory._scripts import ROOM_SCRIPT_NAMES, SCRIPT_NAMES, script_source
from inventory._types import _HOLD_FIELDS, Hold, HoldState, made_hold

EXPECTED_EXPORTS = {
    "DEFAULT_HOLD_TTL",
    "Cart",
    "EVENT_FIELDS",
    "EventError",
    "EventField",
    "OrderEvent",
    "StockEvent",
    "StreamId",
    "TicketRefused",
    "parse_event",
    "parse_events",
    "replay_shuffle",
    "BucketedInventory",
    "ExpiryBatch",
    "Hold",
    "HoldCancelled",
    "HoldClosed",
    "HoldExpired",
    "HoldNotFound",
    "HoldPaid",
    "HoldState",
    "InsufficientStock",
    "InvalidQuantity",
    "InvalidRequest",
    "Inventory",
    "InventoryError",
    "LimitExceeded",
    "Line",
    "OutcomeUnknown",
    "Refused",
    "RoomFigures",
    "RoomSettings",
    "RoomStatus",
    "RequestConflict",
    "SaleKeys",
    "SkuExists",
    "Snapshot",
    "SoldOut",
    "StockState",
    "UnknownSku",
    "WaitingRoom",
    "bucket_sale_id",
    "parent_sale_id",
}


def lua(path: str) -> str:
    return resources.files("inventory").joinpath("lua", path).read_text(encoding="utf-8")


# ----------------------------------------------------------------- the surface


def test_exports_exactly_the_intended_names() -> None:
    assert set(inventory.__all__) == EXPECTED_EXPORTS
    assert len(inventory.__all__) == len(EXPECTED_EXPORTS), "a name is listed twice"
    for name in EXPECTED_EXPORTS:
        assert getattr(inventory, name) is not None


def test_every_error_has_a_distinct_stable_code() -> None:
    # EventError is bad data read back from the stream, not an answer of the engine: it is
    # a ValueError outside the InventoryError tree (tests/test_inventory_events.py).
    errors = [
        obj
        for name in inventory.__all__
        if isinstance(obj := getattr(inventory, name), type)
        and issubclass(obj, Exception)
        and obj is not inventory.EventError
    ]
    assert len(errors) == 17
    assert all(issubclass(cls, inventory.InventoryError) for cls in errors)
    codes = [cls.code for cls in errors]
    assert len(set(codes)) == len(codes)
    assert all(re.fullmatch(r"[a-z_]+", code) for code in codes)


BLOCKED = ("aiohttp", "asyncpg", "uvloop", "flashsale", "locust", "prometheus_client")

IMPORT_WITHOUT_SERVICE = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked for this test: " + name)
        return None
sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
import inventory
from inventory import Inventory, Line
loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
"""


def test_inventory_imports_without_the_service_stack() -> None:
    """`inventory` is embeddable: it must import with aiohttp, asyncpg and the rest of the
    service stack unavailable."""
    proof = subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT_SERVICE], capture_output=True, text=True, timeout=60
    )
    assert proof.returncode == 0, proof.stderr
    assert proof.stdout.strip() == "ok"
    # The blocker itself works (otherwise the test above proves nothing).
    blocked = subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT_SERVICE.replace("import inventory\n", "import aiohttp\n")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert blocked.returncode != 0 and "blocked for this test: aiohttp" in blocked.stderr


# ----------------------------------------------------------- the Lua scripts


def header(name: str) -> str:
    text = lua(f"{name}.lua")
    match = re.match(r"--\[\[\n(.*?)\n\]\]\n", text, re.S)
    assert match, f"{name}.lua does not start with a --[[ header ]]"
    return match.group(1)


def body(name: str) -> str:
    return lua(f"{name}.lua").split("]]\n", 1)[1]


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_has_a_header(name: str) -> None:
    text = header(name)
    assert text.startswith(f"{name}: "), "the header opens with the script's purpose"
    assert re.search(r"^KEYS\[1\]", text, re.M)
    assert re.search(r"^ARGV\[1\]", text, re.M)
    assert re.search(r"^Returns ", text, re.M)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_includes_exist_and_say_what_they_share(name: str) -> None:
    for include in re.findall(r"^-- @include (\w+)$", lua(f"{name}.lua"), re.M):
        assert lua(f"includes/{include}.lua").startswith("-- Shared: ")
    assert "@include" not in script_source(name)


def test_every_include_is_used() -> None:
    names = (*SCRIPT_NAMES, *ROOM_SCRIPT_NAMES)
    used = {inc for n in names for inc in re.findall(r"^-- @include (\w+)$", lua(f"{n}.lua"), re.M)}
    present = {
        p.name.removesuffix(".lua")
        for p in resources.files("inventory").joinpath("lua", "includes").iterdir()
        if p.name.endswith(".lua")
    }
    assert used == present


class Recorder:
    """Stands in front of a registered Script and records the sale, KEYS and ARGV it is sent."""

    def __init__(self, script: Any, calls: list[tuple[str, list[str], list[Any]]], sale: str) -> None:
        self.script, self.calls, self.sale = script, calls, sale

    async def __call__(self, *, keys: list[str], args: list[Any]) -> Any:
        self.calls.append((self.sale, list(keys), list(args)))
        return await self.script(keys=keys, args=args)


async def test_headers_match_the_keys_and_argv_python_sends(redis_url: str) -> None:
    """What each header documents is what the engine really passes: the KEYS in order
    (by name) and the number of ARGV; and each body reads no KEYS/ARGV beyond that."""
    sent: dict[str, list[tuple[str, list[str], list[Any]]]] = {n: [] for n in SCRIPT_NAMES}

    def record(inv: inventory.Inventory) -> None:
        inv._scripts = {n: Recorder(s, sent[n], inv.sale) for n, s in inv._scripts.items()}

    async with open_sale(redis_url, "hdr", coalesce=False) as inv:
        record(inv)
        await inv.stock("a", 10, reserve=2)
        await inv.stock("b", 10)
        await inv.adjust("a", 1)
        await inv.release_reserve("a", 1)
        h1 = await inv.reserve("u", [("a", 1), ("b", 2)], request_id="r1")
        h2 = await inv.reserve("u", "a", request_id="r2")
        await inv.confirm(h1.hold_id)
        await inv.release(h2.hold_id)
        await inv.expire_due()
        # A buckets-split sale's transfers: one made, one cut after its intent and settled.
        split = inventory.BucketedInventory(inv.redis, inv.sale[:20] + "x", 2, coalesce=False)
        for bucket in split.buckets:
            record(bucket)
        await split.stock("a", 10)
        donor, home = split.buckets
        await split.transfer("a", 2, source=donor, target=home)
        await home._mutate("transfer_begin", [home.keys.transfers], ["cut1", donor.sale, "a", 1], "a")
        await split.settle_transfers(older_than_s=0)
        for bucket in split.buckets:
            await inv.redis.delete(*bucket.keys.all())
    for name in SCRIPT_NAMES:
        assert sent[name], f"{name} was not exercised"
        doc, code = header(name), body(name)
        keys_doc = dict(re.findall(r"KEYS\[(\d+)\]\s+(\w+)", doc))
        for sale, keys, args in sent[name]:
            assert [f"{{fs:{sale}}}:{keys_doc[str(i + 1)]}" for i in range(len(keys_doc))] == keys
            used = {int(i) for i in re.findall(r"KEYS\[(\d+)\]", code)}
            assert used == set(range(1, len(keys) + 1)), f"{name} reads KEYS {sorted(used)}"
            argv_doc = {int(i) for i in re.findall(r"ARGV\[(\d+)\]", doc)}
            if name == "reserve":  # ARGV[1] = N, then N groups of 5 + 2 * lines
                assert argv_doc == {1}
                pos, groups = 1, 0
                while pos < len(args):
                    pos += 5 + 2 * int(args[pos + 4])
                    groups += 1
                assert pos == len(args) and groups == args[0]
            else:
                assert argv_doc == set(range(1, len(args) + 1)), f"{name} header vs {args}"
                read = {int(i) for i in re.findall(r"ARGV\[(\d+)\]", code)}
                assert read == argv_doc, f"{name} body reads ARGV {sorted(read)}"


def test_codes_table_matches_python() -> None:
    lua_codes = {
        name: int(value)
        for name, value in re.findall(r"^local ([A-Z_]+) = (\d+)$", lua("includes/codes.lua"), re.M)
    }
    py_codes = {name: value for name, value in vars(_errors).items() if re.fullmatch(r"[A-Z_]+", name)}
    assert lua_codes == py_codes
    assert len(set(lua_codes.values())) == len(lua_codes)


def test_every_refusal_code_maps_to_its_own_exception() -> None:
    samples = {
        _errors.SOLD_OUT: [_errors.SOLD_OUT, b"a", 0],
        _errors.LIMIT_EXCEEDED: [_errors.LIMIT_EXCEEDED, b"a", 2, 2],
        _errors.UNKNOWN_SKU: [_errors.UNKNOWN_SKU, b"a"],
        _errors.INVALID: [_errors.INVALID, b"bad"],
        _errors.REQUEST_CONFLICT: [_errors.REQUEST_CONFLICT, b"s.h"],
        _errors.HOLD_NOT_FOUND: [_errors.HOLD_NOT_FOUND],
        _errors.HOLD_EXPIRED: [_errors.HOLD_EXPIRED],
        _errors.HOLD_CANCELLED: [_errors.HOLD_CANCELLED],
        _errors.HOLD_PAID: [_errors.HOLD_PAID],
        _errors.SKU_EXISTS: [_errors.SKU_EXISTS],
        _errors.INSUFFICIENT_STOCK: [_errors.INSUFFICIENT_STOCK, b"a", 3],
    }
    refusal_codes = {v for n, v in vars(_errors).items() if re.fullmatch(r"[A-Z_]+", n)} - {
        _errors.OK,
        _errors.REPLAYED,
    }
    assert set(samples) == refusal_codes
    mapped = {code: type(_errors.error_for(reply, subject="x")) for code, reply in samples.items()}
    assert inventory.InventoryError not in mapped.values()
    assert len(set(mapped.values())) == len(mapped)
    assert _errors.error_for([_errors.INVALID, b"invalid_quantity"]).code == "invalid_quantity"


def test_lua_bounds_match_python() -> None:
    lua_bounds = dict(re.findall(r"^local (MAX_[A-Z_]+) = (\d+)$", lua("includes/counts.lua"), re.M))
    assert {k: int(v) for k, v in lua_bounds.items()} == {
        name: getattr(_validate, name)
        for name in ("MAX_UNITS", "MAX_QTY", "MAX_LINES", "MAX_TTL_MS", "MAX_BATCH")
    }


# ------------------------------------------------------------------ behaviour


async def test_stock_reserve_confirm_release_expire(redis_url: str) -> None:
    async with open_sale(redis_url, "basic") as inv:
        snap = await inv.stock("phone", 10, reserve=2, limit_per_user=3, low_stock_line=1)
        assert (snap.total, snap.available, snap.held, snap.sold, snap.reserve) == (10, 8, 0, 0, 2)
        assert (snap.limit_per_user, snap.low_stock_line) == (3, 1)
        assert await inv.snapshot("nothing") is None

        paid = await inv.reserve("alice", [inventory.Line("phone", 2)], request_id="r-1")
        assert paid.state is inventory.HoldState.HELD and not paid.replayed
        assert paid.user == "alice" and paid.lines == (inventory.Line("phone", 2),)
        assert inventory.Inventory.sale_of(paid.hold_id) == inv.sale
        assert await inv.hold(paid.hold_id) == paid
        cancelled = await inv.reserve("bob", "phone", request_id="r-2")
        lapsing = await inv.reserve("carol", "phone", request_id="r-3", hold_ttl=0.001)
        snap = await inv.snapshot("phone")
        assert snap is not None and (snap.available, snap.held) == (4, 4)

        assert (await inv.confirm(paid.hold_id, user="alice")).state is inventory.HoldState.PAID
        assert (await inv.confirm(paid.hold_id)).state is inventory.HoldState.PAID  # idempotent
        assert (await inv.release(cancelled.hold_id, user="bob")).state is inventory.HoldState.CANCELLED
        assert (await inv.release(cancelled.hold_id)).state is inventory.HoldState.CANCELLED
        with pytest.raises(inventory.HoldPaid):
            await inv.release(paid.hold_id)
        with pytest.raises(inventory.HoldCancelled):
            await inv.confirm(cancelled.hold_id)

        await asyncio.sleep(0.01)  # well past the 1 ms deadline (Redis's clock is the wall clock)
        batch = await inv.expire_due()
        assert batch == inventory.ExpiryBatch(expired=(lapsing.hold_id,), more=False)
        assert (await inv.expire_due()).expired == ()
        with pytest.raises(inventory.HoldExpired):
            await inv.confirm(lapsing.hold_id)
        assert (await inv.release(lapsing.hold_id)).state is inventory.HoldState.EXPIRED

        snap = await inv.snapshot("phone")
        assert snap is not None
        assert (snap.total, snap.available, snap.held, snap.sold, snap.reserve) == (10, 6, 0, 2, 2)
        assert snap.balanced

        assert (await inv.release_reserve("phone", 1)).reserve == 1
        snap = await inv.release_reserve("phone")
        assert (snap.available, snap.reserve) == (8, 0)
        snap = await inv.restock("phone", 5)
        assert (snap.total, snap.available) == (15, 13)
        snap = await inv.adjust("phone", -3)
        assert (snap.total, snap.available) == (12, 10)
        assert list(await inv.snapshots()) == ["phone"]

        types = [e["type"] for e in await events(inv.redis, inv.keys)]
        assert types == [
            "stocked",
            "reserved",
            "reserved",
            "reserved",
            "confirmed",
            "released",
            "expired",
            "reserve_released",
            "reserve_released",
            "restocked",
            "written_off",
        ]
        assert await audit_sale(inv.redis, inv.keys) == []


async def test_a_late_payment_loses_to_the_deadline(redis_url: str) -> None:
    """Confirm after the deadline but before the sweeper: the deadline wins, the units go
    back on sale, and the hold is expired (not paid)."""
    async with open_sale(redis_url, "late") as inv:
        await inv.stock("phone", 1)
        hold = await inv.reserve("alice", "phone", request_id="r", hold_ttl=0.001)
        await asyncio.sleep(0.01)
        with pytest.raises(inventory.HoldExpired):
            await inv.confirm(hold.hold_id)
        assert (await inv.hold(hold.hold_id)).state is inventory.HoldState.EXPIRED  # type: ignore[union-attr]
        assert (await inv.snapshot("phone")).available == 1  # type: ignore[union-attr]
        assert (await inv.expire_due()).expired == ()


async def test_per_user_limit_counts_held_and_bought_units(redis_url: str) -> None:
    async with open_sale(redis_url, "limit") as inv:
        await inv.stock("phone", 10, limit_per_user=2)
        first = await inv.reserve("alice", [("phone", 2)], request_id="r1")
        with pytest.raises(inventory.LimitExceeded) as refused:
            await inv.reserve("alice", "phone", request_id="r2")
        assert (refused.value.limit, refused.value.already) == (2, 2)
        await inv.reserve("bob", [("phone", 2)], request_id="r3")  # the limit is per buyer
        await inv.confirm(first.hold_id)
        with pytest.raises(inventory.LimitExceeded):  # bought units still count
            await inv.reserve("alice", "phone", request_id="r4")
        await inv.stock("case", 10, limit_per_user=1)
        cancelled = await inv.reserve("carol", "case", request_id="r5")
        await inv.release(cancelled.hold_id)
        await inv.reserve("carol", "case", request_id="r6")  # cancelled units no longer count


async def test_sold_out_refusal_says_what_is_left(redis_url: str) -> None:
    async with open_sale(redis_url, "soldout") as inv:
        await inv.stock("phone", 3)
        await inv.stock("case", 1)
        with pytest.raises(inventory.SoldOut) as refused:
            await inv.reserve("alice", [("phone", 2), ("case", 2)], request_id="r1")
        assert (refused.value.sku, refused.value.available, refused.value.code) == ("case", 1, "sold_out")
        assert (await inv.snapshot("phone")).available == 3  # type: ignore[union-attr]  # all or nothing


@pytest.mark.parametrize(
    ("low_line", "take", "state"),
    [
        (3, 6, inventory.StockState.IN_STOCK),  # 4 left, above the line
        (3, 7, inventory.StockState.LOW),  # 3 left: at the line is low
        (3, 9, inventory.StockState.LOW),
        (3, 10, inventory.StockState.SOLD_OUT),
        (0, 9, inventory.StockState.IN_STOCK),  # no line: never "low"
        (0, 10, inventory.StockState.SOLD_OUT),
    ],
)
async def test_stock_state_low_and_sold_out_lines(
    redis_url: str, low_line: int, take: int, state: inventory.StockState
) -> None:
    async with open_sale(redis_url, "state") as inv:
        await inv.stock("phone", 12, reserve=2, low_stock_line=low_line)
        await inv.reserve("alice", [("phone", take)], request_id="r")
        snap = await inv.snapshot("phone")
        assert snap is not None and snap.available == 10 - take
        assert snap.state is state


async def test_sold_out_state_even_with_units_in_the_reserve_pool(redis_url: str) -> None:
    async with open_sale(redis_url, "pool") as inv:
        snap = await inv.stock("phone", 5, reserve=5)
        assert snap.state is inventory.StockState.SOLD_OUT
        with pytest.raises(inventory.SoldOut):
            await inv.reserve("alice", "phone", request_id="r")
        assert (await inv.release_reserve("phone", 2)).state is inventory.StockState.IN_STOCK


def test_default_hold_ttl_is_thirty_minutes() -> None:
    assert timedelta(minutes=30) == inventory.DEFAULT_HOLD_TTL


@pytest.mark.parametrize(
    ("engine_ttl", "call_ttl", "expected_ms"),
    [
        (None, None, 30 * 60 * 1000),
        (timedelta(seconds=90), None, 90_000),
        (45, None, 45_000),
        (0.25, None, 250),
        (None, 5, 5_000),
        (timedelta(minutes=2), timedelta(seconds=7), 7_000),
    ],
)
async def test_hold_ttl_is_configurable(
    redis_url: str, engine_ttl: Any, call_ttl: Any, expected_ms: int
) -> None:
    options = {} if engine_ttl is None else {"hold_ttl": engine_ttl}
    async with open_sale(redis_url, "ttl", **options) as inv:
        await inv.stock("phone", 1)
        hold = await inv.reserve("alice", "phone", request_id="r", hold_ttl=call_ttl)
        assert hold.deadline_ms - hold.created_ms == expected_ms
        assert await inv.redis.zscore(inv.keys.deadlines, hold.hold_id) == hold.deadline_ms


async def test_every_hold_a_batch_makes_is_what_redis_stores(redis_url: str) -> None:
    """The engine answers a hold it made from what it sent (its id, drawn 64 at a time,
    and its state) and the script's clock: every answer must equal the stored hold, and
    ids stay unique and '<sale>.<24 hex digits>' across draws."""
    async with open_sale(redis_url, "answers") as inv:
        await inv.stock("phone", 1000)
        holds = await asyncio.gather(
            *(inv.reserve(f"u{i}", "phone", request_id=f"r{i}", hold_ttl=60 + i % 3) for i in range(200))
        )
        assert len({h.hold_id for h in holds}) == 200
        for hold in holds:
            assert re.fullmatch(re.escape(inv.sale) + r"\.[0-9a-f]{24}", hold.hold_id)
            assert await inv.hold(hold.hold_id) == hold
            assert hold.deadline_ms - hold.created_ms == (60 + int(hold.user[1:]) % 3) * 1000


def test_a_hold_built_the_fast_way_is_the_hold_the_dataclass_makes() -> None:
    """The engine builds each reservation's Hold through the slots' setters, not the frozen
    dataclass's __init__: the same fields, equal, hashed alike, still frozen."""
    cart = inventory.Inventory.check_reserve("buyer-1", [("b", 2), ("a", 1)], "req-1")
    for replayed in (False, True):
        values = ("sale.abc", "buyer-1", cart, HoldState.HELD, 1_800_000_000_000, 1_799_999_000_000, "req-1")
        fast = made_hold(*values, replayed)
        slow = Hold(*values, replayed=replayed)
        assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
        assert tuple(getattr(fast, name) for name in _HOLD_FIELDS) == (*values, replayed)
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.state = HoldState.PAID  # type: ignore[misc]
    assert [f.name for f in dataclasses.fields(Hold)] == list(_HOLD_FIELDS)
