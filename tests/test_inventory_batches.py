"""How a coalesced batch travels: framed by the engine in one pass and sent over a
connection of the client's own pool (``_scripts.BatchScript``). Each caller gets its own
answer; a batch whose answer is lost is OutcomeUnknown for every caller in it and the
next batch works; a batch re-sent after its connection was cut replays each caller's hold;
NOSCRIPT (a flushed script cache) reloads the script; a client with one dedicated
connection, or a cluster client, still batches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from inventory_support import audit_sale, new_sale_id, open_sale
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis_mode import command_calls, on_cluster, single_server_only

from flashsale.drills.faultproxy import FaultProxy
from inventory import Hold, HoldState, Inventory, OutcomeUnknown, SoldOut
from inventory._batching import Coalescer
from inventory._scripts import frame

through_a_proxy = single_server_only("cuts the connection to one server with a TCP proxy")


def test_frame_is_what_redis_py_sends() -> None:
    args = [
        b"EVALSHA",
        b"",
        b"0",
        b"caf\xc3\xa9",
        b"x" * 70_000,
        b"with\r\nnewline",
        b"%d",
        b"y" * 4096,
        b"z" * 4097,
        b"z" * 4097,
    ]
    packed = b"".join(Connection().pack_command(*args))
    assert b"*%d\r\n$7\r\nEVALSHA%b\r\n" % (len(args), frame(args[1:])) == packed
    assert frame([]) == b""


async def evalsha_calls(client: Any) -> int:
    return await command_calls(client, "evalsha")


async def test_each_caller_of_a_batch_gets_its_own_answer(redis_url: str) -> None:
    """Carts of different buyers, SKUs and quantities in the same batches; one SKU sells
    out part-way. Each answer is the caller's own: its buyer, its lines, a hold Redis has
    under that buyer, or SoldOut only for the scarce SKU."""
    async with open_sale(redis_url, "answers", max_batch=16) as inv:
        await inv.stock("plenty", 10_000)
        await inv.stock("scarce", 20)
        carts = [
            (f"u{i}", [("plenty", 1 + i % 3)] + ([("scarce", 1)] if i % 4 == 0 else []), f"r{i}")
            for i in range(200)
        ]
        before = await evalsha_calls(inv.redis)
        outcomes = await asyncio.gather(
            *(inv.reserve(user, lines, request_id=rid) for user, lines, rid in carts), return_exceptions=True
        )
        calls = await evalsha_calls(inv.redis) - before
        assert calls < 200 / 4, f"{calls} script calls for 200 reservations: they were not batched"
        sold_out = 0
        for (user, lines, rid), outcome in zip(carts, outcomes, strict=True):
            if isinstance(outcome, SoldOut):
                assert any(sku == "scarce" for sku, _ in lines), (user, outcome)
                sold_out += 1
                continue
            assert isinstance(outcome, Hold), outcome
            assert (outcome.user, outcome.request_id) == (user, rid)
            assert [(line.sku, line.qty) for line in outcome.lines] == sorted(lines)
            stored = await inv.hold(outcome.hold_id)
            assert stored is not None and (stored.user, stored.lines) == (user, outcome.lines)
        assert sold_out == 50 - 20
        assert len({o.hold_id for o in outcomes if isinstance(o, Hold)}) == 200 - sold_out
        assert await audit_sale(inv.redis, inv.keys) == []


@asynccontextmanager
async def proxied(redis_url: str, *, resends: int) -> AsyncIterator[tuple[FaultProxy, Redis]]:
    """A fault proxy in front of the suite's Redis and a client through it that re-sends
    a command ``resends`` times after a lost connection."""
    parsed = parse_url(redis_url)
    proxy = await FaultProxy(parsed.get("host", "127.0.0.1"), parsed.get("port", 6379)).start()
    client = Redis(
        host="127.0.0.1",
        port=proxy.port,
        db=parsed.get("db", 0),
        socket_timeout=10,
        retry=Retry(NoBackoff(), resends),
    )
    try:
        yield proxy, client
    finally:
        await client.aclose()
        await proxy.aclose()


async def held_reaches(inv: Inventory, sku: str, held: int) -> None:
    """Wait until Redis holds ``held`` units of ``sku`` (the batch has run there)."""
    while (snap := await inv.snapshot(sku)) is None or snap.held < held:
        await asyncio.sleep(0.01)


async def cut_after_the_batch_ran(
    proxy: FaultProxy, watcher: Inventory, calls: list[Any], held: int
) -> list[Any]:
    """Start ``calls`` with replies blackholed; once the batch has run in Redis, reset the
    connection (healing the proxy in the same step, for any re-send); their outcomes."""
    proxy.blackhole("down")
    tasks = [asyncio.ensure_future(call) for call in calls]
    await held_reaches(watcher, "phone", held)
    proxy.reset()
    proxy.heal()
    return list(await asyncio.gather(*tasks, return_exceptions=True))


@through_a_proxy
async def test_a_batch_whose_connection_is_cut_is_outcome_unknown_for_every_caller(redis_url: str) -> None:
    async with open_sale(redis_url, "cut") as watcher, proxied(redis_url, resends=0) as (proxy, client):
        inv = Inventory(client, watcher.sale)
        await watcher.stock("phone", 100)
        await inv.reserve("warm", "phone", request_id="warm")  # the pool has a connection
        before = await evalsha_calls(watcher.redis)
        calls = [inv.reserve(f"u{i}", "phone", request_id=f"r{i}") for i in range(10)]
        outcomes = await cut_after_the_batch_ran(proxy, watcher, calls, held=11)
        assert await evalsha_calls(watcher.redis) - before == 1, "the ten travelled as one batch"
        assert all(isinstance(o, OutcomeUnknown) for o in outcomes), outcomes
        assert {o.details.get("request_id") for o in outcomes} == {f"r{i}" for i in range(10)}
        # The next batch goes out on a new connection: the retries learn their holds.
        again = await asyncio.gather(*(inv.reserve(f"u{i}", "phone", request_id=f"r{i}") for i in range(10)))
        fresh = await inv.reserve("late", "phone", request_id="late")
        assert all(h.replayed for h in again) and not fresh.replayed
        assert (await watcher.snapshot("phone")).held == 12  # type: ignore[union-attr]
        await inv.aclose()
        assert await audit_sale(watcher.redis, watcher.keys) == []


@through_a_proxy
async def test_a_batch_resent_after_its_connection_was_cut_replays_each_hold(redis_url: str) -> None:
    async with open_sale(redis_url, "resent") as watcher, proxied(redis_url, resends=1) as (proxy, client):
        inv = Inventory(client, watcher.sale)
        await watcher.stock("phone", 100)
        await inv.reserve("warm", "phone", request_id="warm")
        before = await evalsha_calls(watcher.redis)
        calls = [inv.reserve(f"u{i}", "phone", request_id=f"r{i}") for i in range(10)]
        outcomes = await cut_after_the_batch_ran(proxy, watcher, calls, held=11)
        assert await evalsha_calls(watcher.redis) - before == 2, "one batch, sent twice"
        assert all(isinstance(o, Hold) and o.replayed for o in outcomes), outcomes
        assert [o.user for o in outcomes] == [f"u{i}" for i in range(10)]
        assert (await watcher.snapshot("phone")).held == 11  # type: ignore[union-attr]
        await inv.aclose()
        assert await audit_sale(watcher.redis, watcher.keys) == []


async def test_a_batch_after_the_script_cache_was_flushed_reloads_the_script(redis_url: str) -> None:
    async with open_sale(redis_url, "flushed") as inv:
        await inv.stock("phone", 100)
        first = await asyncio.gather(*(inv.reserve(f"u{i}", "phone", request_id="r") for i in range(5)))
        await inv.redis.script_flush()
        assert await inv.redis.script_exists(inv._scripts["reserve"].sha) == [False]
        second = await asyncio.gather(*(inv.reserve(f"v{i}", "phone", request_id="r") for i in range(5)))
        again = await asyncio.gather(*(inv.reserve(f"u{i}", "phone", request_id="r") for i in range(5)))
        assert not any(h.replayed for h in first + second) and all(h.replayed for h in again)
        assert [h.hold_id for h in again] == [h.hold_id for h in first]
        assert (await inv.snapshot("phone")).held == 10  # type: ignore[union-attr]


async def test_a_client_with_one_dedicated_connection_batches_too(redis_url: str) -> None:
    if on_cluster():
        pytest.skip("a cluster client has no single-connection mode")
    client = Redis.from_url(redis_url, single_connection_client=True)
    try:
        inv = Inventory(client, new_sale_id("single"))
        await inv.stock("phone", 100)
        holds = await asyncio.gather(*(inv.reserve(f"u{i}", "phone", request_id="r") for i in range(20)))
        assert [h.user for h in holds] == [f"u{i}" for i in range(20)]
        assert (await inv.snapshot("phone")).held == 20  # type: ignore[union-attr]
        await inv.aclose()
        await client.delete(*inv.keys.all())
    finally:
        await client.aclose()


async def test_a_batch_on_a_decoding_client_reads_its_replies(text_redis: Redis) -> None:
    """A client built with decode_responses=True hands back text: batches parse it as they
    parse bytes (a replay's hold id and state are text in its reply)."""
    inv = Inventory(text_redis, new_sale_id("text"))
    try:
        await inv.stock("phone", 10)
        first = await asyncio.gather(*(inv.reserve(f"u{i}", "phone", request_id="r") for i in range(3)))
        again = await asyncio.gather(*(inv.reserve(f"u{i}", "phone", request_id="r") for i in range(3)))
        assert [h.hold_id for h in again] == [h.hold_id for h in first]
        assert all(h.replayed and h.state is HoldState.HELD for h in again)
    finally:
        await inv.aclose()
        await text_redis.delete(*inv.keys.all())


async def test_a_batch_leaves_for_redis_in_the_loop_turn_after_its_callers(redis_url: str) -> None:
    """The callers of one loop turn start the batch's task, and that task sends the batch
    at its first step, one turn later: not a callback that starts a task a turn later
    still. Under load a turn runs many requests, so every hop delays the whole batch."""
    redis = Redis.from_url(redis_url)
    loop = asyncio.get_running_loop()
    turns = 0

    def count_turns() -> None:
        nonlocal turns
        turns += 1
        loop.call_soon(count_turns)

    sent_at: list[int] = []

    async def call(argv: list[Any]) -> list[Any]:
        sent_at.append(turns)
        replies: list[Any] = await redis.eval("return ARGV", 0, *argv[1:])
        return replies

    coalescer = Coalescer(call, max_batch=2)
    try:
        loop.call_soon(count_turns)
        await asyncio.sleep(0)  # the counter runs from here on, once per turn
        started = turns
        futures = [coalescer.submit([b"v%d" % i]) for i in range(5)]
        assert [await f for f in futures] == [b"v0", b"v1", b"v2", b"v3", b"v4"]
        # Three batches of at most two, all sent in the turn after their callers'.
        assert len(sent_at) == 3 and all(at <= started + 1 for at in sent_at), (started, sent_at)
    finally:
        await redis.aclose()


async def test_a_batch_task_cancelled_before_it_ran_cancels_its_callers_and_the_next_batch_goes(
    redis_url: str,
) -> None:
    """A loop shutting down may cancel the batch's task before its first step: its callers
    are cancelled rather than left waiting, and the next caller starts a batch again."""
    redis = Redis.from_url(redis_url)

    async def call(argv: list[Any]) -> list[Any]:
        replies: list[Any] = await redis.eval("return ARGV", 0, *argv[1:])
        return replies

    coalescer = Coalescer(call, max_batch=16)
    try:
        first = coalescer.submit([b"lost"])
        this = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not this:
                task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await coalescer.submit([b"next"]) == b"next"
        await coalescer.drain()
    finally:
        await redis.aclose()
