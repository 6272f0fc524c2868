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
from redis_mode import command_calls

from inventory import Inventory, Line, RoomSettings, TicketRefused, WaitingRoom, replay_shuffle
from inventory._room import TOLD_BUCKETS_MS, WAIT_BUCKETS_MS
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


def test_the_histogram_bounds_in_lua_are_pythons() -> None:
    text = resources.files("inventory").joinpath("lua", "includes", "room.lua").read_text()
    for name, bounds in (("WAIT_BUCKETS_MS", WAIT_BUCKETS_MS), ("TOLD_BUCKETS_MS", TOLD_BUCKETS_MS)):
        (table,) = re.findall(rf"^local {name} = {{([\d, ]+)}}$", text, re.M)
        assert tuple(int(b) for b in table.split(",")) == bounds, name


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
    # A buyer who comes after the sell-out is told at once: 0 ms of waiting for stock that is gone.
    late = await sale.room.join("late", ["phone"])
    assert (late.state, late.told_after_ms) == ("sold_out", 0)


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
    assert await sale.room.settle("b0", "r-b0")
    assert (await sale.room.poll("b1")).state == "waiting"  # the unit is held, not gone
    while not (await inv.expire_due()).expired:
        await asyncio.sleep(0.05)
    assert (await sale.room.poll("b2")).state == "waiting"
    assert (await sale.room.poll("b1")).state == "admitted"


# ---------------------------------------------------------------- tickets
async def test_a_spent_ticket_holds_its_unit_until_the_order_settles(sale: Sale) -> None:
    """Between spending a ticket and the order's reservation the unit is still available:
    were the ticket released at once, the room would admit a second buyer for that one unit
    (seen in a rehearsal: admitted buyers told "sold out"). It counts until settled."""
    await sale.inv.stock("phone", 1)
    await _open_room(sale, rate=1000)
    alice = await sale.room.join("alice", ["phone"])
    assert alice.state == "admitted" and (await sale.room.join("bob", ["phone"])).state == "waiting"
    await sale.room.use("alice", alice.ticket_nonce, "r-1")
    assert (await sale.room.poll("bob")).state == "waiting"  # the unit is alice's, not yet held
    await sale.inv.reserve("alice", [Line("phone", 1)], request_id="r-1")
    assert not await sale.room.settle("alice", "r-other") and not await sale.room.settle("bob", "r-1")
    assert await sale.room.settle("alice", "r-1") and await sale.room.settle("alice", "r-1")  # idempotent
    assert (await sale.room.poll("bob")).state == "waiting"  # held now: nothing left to admit for
    assert (await sale.room.figures()).tickets_out == 0


async def test_a_spent_ticket_never_settled_is_released_at_its_expiry(sale: Sale) -> None:
    """A service process that dies between spending a ticket and settling it does not hold
    the unit forever: the ticket's expiry releases it (the room admits slower, never more)."""
    await sale.inv.stock("phone", 1)
    await _open_room(sale, rate=1000, ticket_ttl_ms=300)
    alice = await sale.room.join("alice", ["phone"])
    await sale.room.join("bob", ["phone"])
    await sale.room.use("alice", alice.ticket_nonce, "r-1")  # ... and the order never came
    while await _server_ms(sale.redis) <= alice.ticket_expires_ms:
        await asyncio.sleep(0.05)
    assert (await sale.room.poll("bob")).state == "admitted"
    assert (await sale.room.poll("alice")).state == "used"


async def test_a_ticket_admits_only_the_skus_its_buyer_queued_for(sale: Sale) -> None:
    """Admission is by each SKU's stock: a ticket won in the short queue of a plentiful SKU
    must not buy the scarce one past its queue. Refused before anything changes."""
    await sale.inv.stock("phone", 1)
    await sale.inv.stock("case", 100)
    await _open_room(sale, rate=1000)
    mallory = await sale.room.join("mallory", ["case"])
    assert mallory.state == "admitted" and mallory.skus == ("case",)
    before = await sale.room.record()
    with pytest.raises(TicketRefused) as refused:
        await sale.room.use("mallory", mallory.ticket_nonce, "r-1", ["case", "phone"])
    assert refused.value.reason == "ticket_other_sku"
    assert await sale.room.record() == before
    await sale.room.use("mallory", mallory.ticket_nonce, "r-1", ["case"])


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


# ---------------------------------------------------------------- what the room counts
async def test_figures_count_joins_admissions_waits_and_tellings(sale: Sale) -> None:
    """One read gives the queue lengths, the counters, the wait histogram (a pre-queue
    buyer's wait starts at T0, not when they joined) and the told-after histogram."""
    await sale.inv.stock("phone", 1)
    await sale.inv.stock("case", 100)
    before = await sale.room.figures()
    assert before.on is False and before.joined == 0 and before.wait_quantile_ms(0.5) is None
    await _open_room(sale, rate=1000, opens_in_ms=60_000)
    for buyer in ("p0", "p1", "p2"):
        await sale.room.join(buyer, ["phone"])
    early = await sale.room.figures()
    assert (early.on, early.pre_queue, early.waiting, early.joined) == (True, 3, 0, 3)
    await _open_room(sale, rate=1000)  # T0 is now: the pre-queue is shuffled on the next call
    await sale.room.join("c0", ["case"])
    statuses = {b: await sale.room.poll(b) for b in ("p0", "p1", "p2", "c0")}
    admitted = [b for b, s in statuses.items() if s.state == "admitted"]
    assert len(admitted) == 2 and "c0" in admitted
    mid = await sale.room.figures()
    assert (mid.pre_queue, mid.waiting, mid.tickets_out, mid.admitted) == (0, 2, 2, 2)
    assert sum(n for _, n in mid.wait_buckets) == 2 and mid.wait_buckets[-1][0] == float("inf")
    # Joined a minute before T0, admitted just after it: a wait of well under a minute.
    assert mid.wait_sum_ms < 10_000 and (mid.wait_quantile_ms(0.99) or 0) <= 10_000
    phone = next(b for b in admitted if b != "c0")
    await sale.room.use(phone, statuses[phone].ticket_nonce, "r-1")
    hold = await sale.inv.reserve(phone, [Line("phone", 1)], request_id="r-1")
    await sale.room.settle(phone, "r-1")
    await sale.inv.confirm(hold.hold_id)
    told = [await sale.room.poll(b) for b in ("p0", "p1", "p2") if b != phone]
    assert {s.state for s in told} == {"sold_out"}
    after = await sale.room.figures()
    assert (after.used, after.told_sold_out, after.waiting, after.tickets_out) == (1, 2, 0, 1)
    assert sum(n for _, n in after.told_buckets) == 2
    assert after.told_max_ms == max(s.told_after_ms for s in told)
    assert set(after.sold_out_seen_ms) == {"phone"}
    record = await sale.room.record()
    assert json.loads(record["buyers"][phone])["u"] >= json.loads(record["buyers"][phone])["a"]


async def test_the_headroom_says_how_soon_a_sell_out_could_come(sale: Sale) -> None:
    """A waiting buyer learns how many units no ticket speaks for: the soonest their SKU
    could sell out is the time to admit that many buyers (the service polls them sooner
    as it nears 0)."""
    await sale.inv.stock("phone", 30)
    await _open_room(sale, rate=2.0)  # a burst of 2, then 2 a second
    for i in range(5):
        await sale.room.join(f"b{i}", ["phone"])
    waiting = await sale.room.poll("b4")
    assert waiting.state == "waiting" and waiting.headroom == 28  # two tickets out
    assert waiting.sell_out_horizon_s == (28 - 2) / 2.0
    admitted = await sale.room.poll("b0")
    assert admitted.headroom == -1 and admitted.sell_out_horizon_s == float("inf")
    await sale.inv.reserve("x", [Line("phone", 28)], request_id="r-x")  # all but the spoken-for
    edge = await sale.room.poll("b4")
    assert edge.headroom == 0 and edge.sell_out_horizon_s == 0.0


async def test_polls_of_a_blocked_queue_do_not_read_its_head_again(sale: Sale) -> None:
    """A queue waiting for held units (every unit spoken for) cannot move until something
    changes: a poll then costs a few reads, not a scan of up to 200 buyer records — and the
    first change (a ticket's order settled and refused: its unit free again) admits the
    next buyer at once."""
    await sale.inv.stock("phone", 1)
    await _open_room(sale, rate=1000)
    alice = await sale.room.join("alice", ["phone"])
    for i in range(150):
        await sale.room.join(f"w{i:03d}", ["phone"])
    await sale.room.poll("w000")  # a fruitless scan: it notes what it saw
    before = await command_calls(sale.redis, "hget")
    for i in range(10):
        assert (await sale.room.poll(f"w{i:03d}")).state == "waiting"
    per_poll = (await command_calls(sale.redis, "hget") - before) / 10
    assert per_poll < 20, per_poll  # a scan reads each of the 150 records (and more)
    await sale.room.use("alice", alice.ticket_nonce, "r-1")
    await sale.room.settle("alice", "r-1")  # her order was refused: the unit is free
    assert (await sale.room.poll("w149")).state == "waiting"
    assert (await sale.room.poll("w000")).state == "admitted"  # the head, in order
