"""What a coalesced batch costs Redis: the commands reserve.lua runs per batch. Redis
charges per command a script runs (and per argument of one), so the script reads each hash
once per batch (one HMGET), writes each once (one HSET, one ZADD for the deadlines) and
appends one event entry for all its holds, one field each (the stream's contract): a batch
of N holds runs a handful of commands, whatever N is (issue 15: the engine's Redis CPU per
reservation)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from inventory_support import audit_sale, open_sale
from redis_mode import command_calls

from inventory import Inventory
from inventory._errors import UNKNOWN_SKU
from inventory._keys import SaleKeys
from inventory._scripts import script_source

#: What a script may run: the commands counted as the batch's cost.
SCRIPT_COMMANDS = ("time", "hget", "hmget", "hexists", "hset", "hincrby", "zadd", "xadd")
#: Reads, writes and the clock of one batch, besides its XADD: an HMGET and an HSET of the
#: requests, users and stock hashes, an HMGET of the holds, an HSET of them, a ZADD, TIME.
FIXED = 10
BATCH = 64


async def commands_run(inv: Inventory) -> dict[str, int]:
    counts = await asyncio.gather(*(command_calls(inv.redis, c) for c in ("evalsha", *SCRIPT_COMMANDS)))
    return dict(zip(("evalsha", *SCRIPT_COMMANDS), counts))


@pytest.mark.parametrize("limit", [0, 10])
async def test_a_batch_runs_one_xadd_and_a_fixed_number_of_other_commands(redis_url: str, limit: int) -> None:
    async with open_sale(redis_url, "cost", max_batch=BATCH) as inv:
        await inv.stock("hot", 1000, limit_per_user=limit)
        await inv.stock("cold", 1000)
        await inv.load_scripts()  # a NOSCRIPT round trip would count as a second call
        carts: list[Any] = [[("hot", 1), ("cold", 2)] if i % 3 == 0 else "hot" for i in range(BATCH)]
        before = await commands_run(inv)
        holds = await asyncio.gather(
            *(inv.reserve(f"u{i % 20}", cart, request_id=f"r{i}") for i, cart in enumerate(carts))
        )
        ran = {name: calls - before[name] for name, calls in (await commands_run(inv)).items()}
        assert ran.pop("evalsha") == 1, "the batch travelled as one script call"
        assert len({h.hold_id for h in holds}) == BATCH
        assert ran.pop("xadd") == 1, "one event entry per call"
        assert sum(ran.values()) <= FIXED, ran
        snap = await inv.snapshot("hot")
        assert snap is not None and snap.held == BATCH
        assert await audit_sale(inv.redis, inv.keys) == []


async def test_the_largest_batch_reads_and_writes_in_slices(redis_url: str) -> None:
    """1,000 carts of 20 lines in one call: 20,000 per-user counts to read and write, more
    than Lua's unpack() takes at once, so the script reads and writes them in slices."""
    skus = [f"s{i:02d}" for i in range(20)]
    async with open_sale(redis_url, "slices", max_batch=1000, max_connections=4) as inv:
        for sku in skus:
            await inv.stock(sku, 1000, limit_per_user=1)
        await inv.load_scripts()
        before = await commands_run(inv)
        holds = await asyncio.gather(
            *(inv.reserve(f"u{i}", [(sku, 1) for sku in skus], request_id="r") for i in range(1000))
        )
        assert (await commands_run(inv))["evalsha"] - before["evalsha"] == 1
        assert len({h.hold_id for h in holds}) == 1000
        # The holds' entry is not sliced: 2,000 values, within what unpack() takes.
        (_, last), *_ = await inv.redis.xrevrange(inv.keys.events, count=1)
        assert last[b"type"] == b"reserved_batch" and len(last) == 2 + 1000
        for sku in skus:
            snap = await inv.snapshot(sku)
            assert snap is not None and (snap.available, snap.held) == (0, 1000)
        assert await audit_sale(inv.redis, inv.keys) == []


async def test_records_joined_by_hand_are_the_json_cjson_writes(redis_url: str) -> None:
    """To save Redis work the script joins the hold and request records by hand, quoting
    the fingerprint itself when the user and every SKU need no escaping. The library
    refuses such names, so the script is called directly with a user and a SKU that need
    escaping ('/', '"', '\\'): their records must be the JSON cjson writes, escapes and all."""
    user = 'b/o"b\\'
    async with open_sale(redis_url, "json") as inv:
        await inv.stock("hot", 10)
        await inv.redis.hset(
            inv.keys.stock,
            mapping={f"s/x:{field}": value for field, value in STOCKED},
        )
        reserve = inv.redis.register_script(script_source("reserve"))
        hold_a, hold_b = f"{inv.sale}.a", f"{inv.sale}.b"
        args = [
            2,
            "q1",
            hold_a,
            user,
            60000,
            2,
            "hot",
            1,
            "s/x",
            2,
            "q2",
            hold_b,
            "plain",
            60000,
            1,
            "hot",
            1,
        ]
        replies = await reserve(keys=inv.keys.for_reserve(), args=args)
        assert all(isinstance(reply, int) for reply in replies), replies  # two holds made: their deadlines
        escaped = await inv.redis.hget(inv.keys.requests, SaleKeys.request_field(user, "q1"))
        plain = await inv.redis.hget(inv.keys.requests, SaleKeys.request_field("plain", "q2"))
        assert _text(escaped) == '{"h":"' + hold_a + '","f":"b\\/o\\"b\\\\|hot:1|s\\/x:2"}'
        assert _text(plain) == '{"h":"' + hold_b + '","f":"plain|hot:1"}'
        record = json.loads(_text(await inv.redis.hget(inv.keys.holds, hold_a)))
        assert (record["u"], record["l"], record["r"]) == (user, [["hot", 1], ["s/x", 2]], "q1")
        raw_hold = _text(await inv.redis.hget(inv.keys.holds, hold_a))
        assert raw_hold.startswith('{"u":"b\\/o\\"b\\\\","l":[["hot",1],["s\\/x",2]],"s":"held","d":"')


STOCKED = (
    ("total", 10),
    ("available", 10),
    ("held", 0),
    ("sold", 0),
    ("reserve", 0),
    ("limit", 0),
    ("low", 0),
)


def _text(value: bytes | str | None) -> str:
    assert value is not None
    return value.decode() if isinstance(value, bytes) else value


async def test_one_value_to_escape_sends_the_whole_batch_through_cjson(redis_url: str) -> None:
    """The script checks once per batch whether any value needs escaping (cjson's own pass
    over the joined ARGV): a control character or DEL in one user's name sends every
    record of that batch through cjson, and each must still be what cjson writes."""
    odd = "c\x01t\x7fl"
    async with open_sale(redis_url, "esc") as inv:
        await inv.stock("hot", 10)
        reserve = inv.redis.register_script(script_source("reserve"))
        holds = {odd: f"{inv.sale}.a", "plain": f"{inv.sale}.b"}
        args: list[Any] = [2]
        for user, hold_id in holds.items():
            args += [f"q-{len(args)}", hold_id, user, 60000, 1, "hot", 1]
        replies = await reserve(keys=inv.keys.for_reserve(), args=args)
        assert all(isinstance(reply, int) for reply in replies), replies
        for user, hold_id in holds.items():
            quoted = [
                _text(await inv.redis.eval("return cjson.encode(ARGV[1])", 0, value))
                for value in (hold_id, f"{user}|hot:1", user)
            ]
            request_id = args[args.index(hold_id) - 1]
            stored = _text(await inv.redis.hget(inv.keys.requests, SaleKeys.request_field(user, request_id)))
            assert stored == '{"h":' + quoted[0] + ',"f":' + quoted[1] + "}"
            raw_hold = _text(await inv.redis.hget(inv.keys.holds, hold_id))
            assert raw_hold.startswith('{"u":' + quoted[2] + ',"l":[["hot",1]],"s":"held","d":"')
            assert json.loads(raw_hold)["u"] == user


async def test_a_colon_elsewhere_in_the_batch_does_not_refuse_good_requests(redis_url: str) -> None:
    """Only request ids and users may not hold ':'. The script searches the batch's joined
    ARGV once and the ids one by one only when that finds one: a SKU with ':' is an
    unknown SKU, and the request beside it is made."""
    async with open_sale(redis_url, "colon") as inv:
        await inv.stock("hot", 10)
        reserve = inv.redis.register_script(script_source("reserve"))
        args = [
            2,
            "q1",
            f"{inv.sale}.a",
            "alice",
            60000,
            1,
            "no:such",
            1,
            "q2",
            f"{inv.sale}.b",
            "bob",
            60000,
            1,
            "hot",
            1,
        ]
        replies = await reserve(keys=inv.keys.for_reserve(), args=args)
        assert [int(replies[0][0]), replies[0][1]] == [UNKNOWN_SKU, b"no:such"]
        assert isinstance(replies[1], int)
        snap = await inv.snapshot("hot")
        assert snap is not None and snap.held == 1
        assert await audit_sale(inv.redis, inv.keys) == []
