"""The stock-aware waiting room, against a real Redis: the pre-queue's one recorded shuffle
at T0, first come first served after it, admission by rate and never beyond what could
still be sold, "sold out" told to every waiting buyer on their next poll, tickets that
admit one order attempt series, and nobody's place lost by joining again."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import pytest
from inventory_support import connect, new_sale_id
from redis.asyncio import Redis

from inventory import Inventory, Line, RoomSettings, TicketRefused, WaitingRoom, replay_shuffle
from inventory._scripts import ROOM_SCRIPT_NAMES, script_source


async def _server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


class Sale:
    def __init__(self, redis: Redis, inv: Inventory, room: WaitingRoom) -> None:
        self.redis, self.inv, self.room = redis, inv, room


@pytest.fixture
async def sale(redis_url: str) -> AsyncIterator[Sale]:
    async with connect(redis_url) as redis:
        name = new_sale_id("room")
        inv = Inventory(redis, name, coalesce=False, hold_ttl=60)
        yield Sale(redis, inv, WaitingRoom(redis, name))
        await redis.delete(*inv.keys.all())


async def _open_room(
    sale: Sale, *, rate: float, factor: float = 1.0, opens_in_ms: int = 0, seed: int | None = None, **kw: Any
) -> int:
    t0 = await _server_ms(sale.redis) + opens_in_ms
    return await sale.room.configure(
        RoomSettings(opens_at_ms=t0, rate_per_s=rate, oversubscribe=factor, **kw), seed=seed
    )


# ---------------------------------------------------------------- the scripts
@pytest.mark.parametrize("name", ROOM_SCRIPT_NAMES)
def test_every_room_script_has_a_header(name: str) -> None:
    text = resources.files("inventory").joinpath("lua", f"{name}.lua").read_text()
    header = text.split("]]", 1)[0]
    assert header.startswith(f"--[[\n{name}: ")
    assert re.search(r"^KEYS\[1\]", header, re.M) and re.search(r"^ARGV\[1\]", header, re.M)
    assert re.search(r"^Returns ", header, re.M)
    assert "@include" not in script_source(name)


def test_the_room_keys_share_the_sales_slot() -> None:
    keys = WaitingRoom(Redis(), "d11").keys.for_room()
    assert all(k.startswith("{fs:d11}:") for k in keys)


# ---------------------------------------------------------------- the pre-queue
async def test_the_pre_queue_gets_one_recorded_shuffle_at_t0(sale: Sale) -> None:
    """Joining early gives no edge: at T0 the pre-queue's order is a shuffle replayable
    from the recorded seed; later joiners queue behind, first come first served."""
    await sale.inv.stock("phone", 1000)
    seed = await _open_room(sale, rate=1000, opens_in_ms=60_000, seed=12345)
    early = [f"early{i:02d}" for i in range(40)]
    for buyer in early:
        status = await sale.room.join(buyer, ["phone"])
        assert status.state == "pre" and status.ahead == 0
    assert (await sale.room.join("early00", ["phone"])).pre_queue == 40  # again: still one place
    # The opening arrives: move T0 to now (the same room; the seed is kept).
    assert await _open_room(sale, rate=0.001, seed=999) == seed == 12345
    late = [f"late{i}" for i in range(5)]
    for buyer in late:
        await sale.room.join(buyer, ["phone"])
    record = await sale.room.record()
    assert record["pre_queue"] == early
    positions = {b: json.loads(r)["p"] for b, r in record["buyers"].items()}
    shuffled = sorted(early, key=positions.__getitem__)
    assert shuffled == replay_shuffle(early, seed)
    assert shuffled != early, "a shuffle of 40 that leaves them in arrival order (p = 1/40!)"
    assert sorted(late, key=positions.__getitem__) == late
    assert min(positions[b] for b in late) > max(positions[b] for b in early)


def test_the_replayed_shuffle_is_uniform() -> None:
    """Every one of 4 buyers lands in every position about equally often over many seeds."""
    counts = {(b, p): 0 for b in "abcd" for p in range(4)}
    for seed in range(1, 24_001):
        for pos, buyer in enumerate(replay_shuffle(list("abcd"), seed * 7919 % 2147483646 + 1)):
            counts[(buyer, pos)] += 1
    assert all(5400 < n < 6600 for n in counts.values()), counts


# ---------------------------------------------------------------- admission
async def test_admission_never_exceeds_what_could_still_be_sold(sale: Sale) -> None:
    await sale.inv.stock("phone", 3)
    await _open_room(sale, rate=1000, factor=1.0)
    statuses = [await sale.room.join(f"b{i}", ["phone"]) for i in range(10)]
    for i in range(10):
        statuses[i] = await sale.room.poll(f"b{i}")
    admitted = [s for s in statuses if s.state == "admitted"]
    assert len(admitted) == 3
    assert [s.ahead for s in statuses if s.state == "waiting"] == list(range(7))
    # with oversubscription 2, twice the units
    await _open_room(sale, rate=1000, factor=2.0)
    statuses = [await sale.room.poll(f"b{i}") for i in range(10)]
    assert sum(s.state == "admitted" for s in statuses) == 6


async def test_admission_runs_at_the_configured_rate(sale: Sale) -> None:
    await sale.inv.stock("phone", 1000)
    await _open_room(sale, rate=2.0)  # a burst of 2, then 2 per second
    started = await _server_ms(sale.redis)
    for i in range(20):
        await sale.room.join(f"b{i}", ["phone"])
    first = [await sale.room.poll(f"b{i}") for i in range(20)]
    elapsed_s = (await _server_ms(sale.redis) - started) / 1000
    assert 2 <= sum(s.state == "admitted" for s in first) <= 2 + 2 * elapsed_s + 1
    admitted = [s for s in first if s.state == "admitted"]
    assert all(s.ticket_nonce and s.ticket_expires_ms > s.now_ms for s in admitted)


async def test_a_sold_out_sku_is_told_to_every_waiting_buyer_on_their_next_poll(sale: Sale) -> None:
    await sale.inv.stock("phone", 2)
    await sale.inv.stock("case", 100)
    await _open_room(sale, rate=1000)
    for i in range(30):
        await sale.room.join(f"p{i}", ["phone"])
    await sale.room.join("c0", ["case"])
    admitted = [f"p{i}" for i in range(30) if (await sale.room.poll(f"p{i}")).state == "admitted"]
    assert len(admitted) == 2
    # both units sold: nothing available, held or in reserve
    for buyer in admitted:
        hold = await sale.inv.reserve(buyer, [Line("phone", 1)], request_id=f"r-{buyer}")
        await sale.inv.confirm(hold.hold_id)
    told = [await sale.room.poll(f"p{i}") for i in range(30) if f"p{i}" not in admitted]
    assert {s.state for s in told} == {"sold_out"}
    assert all(s.told_after_ms >= 0 for s in told)
    assert (await sale.room.poll("c0")).state == "admitted"  # another SKU's buyers go on
    record = await sale.room.record()
    assert int(record["room"]["told_sold_out"]) == 28


async def test_units_coming_back_resume_admission_in_queue_order(sale: Sale) -> None:
    """Held units may lapse: while a hold stands the SKU is not sold out, and when it
    lapses the next buyers in the queue are admitted, in order."""
    inv = Inventory(sale.redis, sale.inv.sale, coalesce=False, hold_ttl=0.3)
    await inv.stock("phone", 1)
    await _open_room(sale, rate=1000, ticket_ttl_ms=60_000)
    for i in range(4):
        await sale.room.join(f"b{i}", ["phone"])
    assert (await sale.room.poll("b0")).state == "admitted"
    status = await sale.room.poll("b0")
    await sale.room.use("b0", status.ticket_nonce, "r-b0")
    await inv.reserve("b0", [Line("phone", 1)], request_id="r-b0")
    assert (await sale.room.poll("b1")).state == "waiting"  # the unit is held, not gone
    while not (await inv.expire_due()).expired:
        await asyncio.sleep(0.05)
    assert (await sale.room.poll("b2")).state == "waiting"
    assert (await sale.room.poll("b1")).state == "admitted"


# ---------------------------------------------------------------- tickets
async def test_a_ticket_admits_one_order_attempt_series(sale: Sale) -> None:
    await sale.inv.stock("phone", 10)
    await _open_room(sale, rate=1000)
    status = await sale.room.join("alice", ["phone"])
    assert status.state == "admitted"
    await sale.room.use("alice", status.ticket_nonce, "r-1")
    await sale.room.use("alice", status.ticket_nonce, "r-1")  # a retry of the same order
    with pytest.raises(TicketRefused) as refused:
        await sale.room.use("alice", status.ticket_nonce, "r-2")
    assert refused.value.reason == "ticket_used"
    with pytest.raises(TicketRefused) as refused:
        await sale.room.use("bob", status.ticket_nonce, "r-1")
    assert refused.value.reason == "ticket_invalid"
    with pytest.raises(TicketRefused) as refused:
        await sale.room.use("alice", "999", "r-1")
    assert refused.value.reason == "ticket_invalid"


async def test_a_lapsed_ticket_gives_its_place_back(sale: Sale) -> None:
    await sale.inv.stock("phone", 1)
    await _open_room(sale, rate=1000, ticket_ttl_ms=200)
    status = await sale.room.join("alice", ["phone"])
    await sale.room.join("bob", ["phone"])
    assert status.state == "admitted"
    assert (await sale.room.poll("bob")).state == "waiting"
    deadline = status.ticket_expires_ms
    while await _server_ms(sale.redis) <= deadline:
        await asyncio.sleep(0.05)
    assert (await sale.room.poll("bob")).state == "admitted"
    with pytest.raises(TicketRefused) as refused:
        await sale.room.use("alice", status.ticket_nonce, "r-late")
    assert refused.value.reason == "ticket_expired"
    again = await sale.room.join("alice", ["phone"])
    assert again.state == "waiting" and again.ahead == 0


async def test_polling_a_room_that_is_off_or_for_a_stranger(sale: Sale) -> None:
    assert (await sale.room.poll("nobody")).state == "room_off"
    await sale.inv.stock("phone", 1)
    await _open_room(sale, rate=1)
    assert (await sale.room.poll("nobody")).state == "not_in_room"


async def test_concurrent_joiners_from_many_clients_get_distinct_places(sale: Sale, redis_url: str) -> None:
    """Several clients (as several service processes would) join at once: every buyer has
    exactly one place, positions are distinct, and admissions never exceed the units."""
    await sale.inv.stock("phone", 25)
    await _open_room(sale, rate=10_000)
    async with connect(redis_url) as other:
        rooms = [sale.room, WaitingRoom(other, sale.inv.sale)]
        buyers = [f"u{i}" for i in range(300)]
        await asyncio.gather(*(rooms[i % 2].join(b, ["phone"]) for i, b in enumerate(buyers)))
        finals = await asyncio.gather(*(rooms[i % 2].poll(b) for i, b in enumerate(buyers)))
    assert sum(s.state == "admitted" for s in finals) == 25
    record = await sale.room.record()
    positions = [json.loads(r)["p"] for r in record["buyers"].values()]
    assert len(positions) == 300 and len(set(positions)) == 300
