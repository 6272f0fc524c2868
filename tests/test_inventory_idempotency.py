"""Idempotency: a request id makes reserve safe to retry — by the caller, inside one
coalesced batch, and when redis-py itself re-sends a script that timed out (the trap
named in ARCHITECTURE.md). A retry returns the first hold and never takes stock twice;
an outcome Redis did not report is OutcomeUnknown, never a refusal."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from inventory_support import audit_sale, connect, drop_sale, dump_sale, events, new_sale_id, open_sale
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis_mode import command_stats, single_server_only

from inventory import (
    BucketedInventory,
    Hold,
    HoldState,
    Inventory,
    LimitExceeded,
    OutcomeUnknown,
    RequestConflict,
    SaleKeys,
    SoldOut,
)

#: The re-send tests build a one-server ``Redis()`` (its default retry is the premise) and
#: DEBUG SLEEP the server the URL names: on a cluster both reach one node of three.
one_server_resend = single_server_only(
    "re-sends through a one-server Redis() client and DEBUG SLEEPs one server"
)


async def evalsha_calls(client: Redis) -> int:
    """EVALSHA calls that ran their script (a NOSCRIPT reply counts as a failed call)."""
    stats = await command_stats(client, "evalsha")  # every master's, on a cluster
    return (
        int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0)) - int(stats.get("rejected_calls", 0))
    )


def reserved_events(log: list[dict[str, str]], request_id: str) -> list[dict[str, str]]:
    return [e for e in log if e["type"] == "reserved" and e["request"] == request_id]


async def test_retry_returns_the_first_hold_and_takes_stock_once(redis_url: str) -> None:
    async with open_sale(redis_url, "idem") as inv:
        await inv.stock("phone", 5)
        first = await inv.reserve("alice", [("phone", 2)], request_id="r-1")
        again = await inv.reserve("alice", [("phone", 2)], request_id="r-1")
        assert not first.replayed and again.replayed
        assert (again.hold_id, again.deadline_ms, again.created_ms) == (
            first.hold_id,
            first.deadline_ms,
            first.created_ms,
        )
        assert (await inv.snapshot("phone")).available == 3  # type: ignore[union-attr]
        await inv.confirm(first.hold_id)
        late = await inv.reserve("alice", [("phone", 2)], request_id="r-1")
        assert late.replayed and late.hold_id == first.hold_id and late.state is HoldState.PAID
        assert (await inv.snapshot("phone")).available == 3  # type: ignore[union-attr]
        assert len(reserved_events(await events(inv.redis, inv.keys), "r-1")) == 1
        assert await audit_sale(inv.redis, inv.keys) == []


async def test_same_request_id_twice_in_one_coalesced_batch(redis_url: str) -> None:
    async with open_sale(redis_url, "batch") as inv:
        await inv.stock("phone", 5)
        before = await evalsha_calls(inv.redis)
        holds = await asyncio.gather(
            inv.reserve("alice", "phone", request_id="dup"),
            inv.reserve("bob", "phone", request_id="other"),
            inv.reserve("alice", "phone", request_id="dup"),
        )
        assert await evalsha_calls(inv.redis) - before == 1, "the three calls travelled as one batch"
        assert holds[0].hold_id == holds[2].hold_id != holds[1].hold_id
        assert [h.replayed for h in holds] == [False, False, True]
        assert (await inv.snapshot("phone")).held == 2  # type: ignore[union-attr]
        assert len(reserved_events(await events(inv.redis, inv.keys), "dup")) == 1


async def test_conflicting_payload_in_one_batch_is_refused(redis_url: str) -> None:
    async with open_sale(redis_url, "batchc") as inv:
        await inv.stock("phone", 5)
        await inv.stock("case", 5)
        results = await asyncio.gather(
            inv.reserve("alice", "phone", request_id="dup"),
            inv.reserve("alice", "case", request_id="dup"),
            inv.reserve("mallory", "phone", request_id="dup"),  # her own "dup": a hold of her own
            return_exceptions=True,
        )
        assert isinstance(results[0], Hold) and isinstance(results[2], Hold)
        assert isinstance(results[1], RequestConflict)
        assert results[1].details["hold_id"] == results[0].hold_id
        assert results[2].hold_id != results[0].hold_id and not results[2].replayed
        snaps = await inv.snapshots()
        assert (snaps["phone"].held, snaps["case"].held) == (2, 0)


@pytest.mark.parametrize("coalesce", [True, False])
async def test_many_concurrent_retries_make_one_hold(redis_url: str, coalesce: bool) -> None:
    async with open_sale(redis_url, "herd", coalesce=coalesce, max_connections=20) as inv:
        await inv.stock("phone", 100)
        holds = await asyncio.gather(
            *(inv.reserve("alice", [("phone", 3)], request_id="same") for _ in range(200))
        )
        assert len({h.hold_id for h in holds}) == 1
        assert sum(not h.replayed for h in holds) == 1
        snap = await inv.snapshot("phone")
        assert snap is not None and (snap.available, snap.held) == (97, 3)
        assert await audit_sale(inv.redis, inv.keys) == []


@pytest.mark.parametrize("lines", [[("phone", 1)], [("phone", 2), ("case", 1)]])
async def test_request_id_reused_with_another_cart_changes_nothing(
    redis_url: str, lines: list[tuple[str, int]]
) -> None:
    async with open_sale(redis_url, "conflict") as inv:
        await inv.stock("phone", 5)
        await inv.stock("case", 5)
        first = await inv.reserve("alice", [("phone", 2)], request_id="r-1")
        before = await dump_sale(inv.redis, inv.keys)
        with pytest.raises(RequestConflict) as conflict:
            await inv.reserve("alice", lines, request_id="r-1")
        assert conflict.value.code == "request_conflict"
        assert conflict.value.details["hold_id"] == first.hold_id
        assert await dump_sale(inv.redis, inv.keys) == before


async def test_cart_order_does_not_change_the_fingerprint(redis_url: str) -> None:
    async with open_sale(redis_url, "order") as inv:
        await inv.stock("phone", 5)
        await inv.stock("case", 5)
        first = await inv.reserve("alice", [("phone", 2), ("case", 1)], request_id="r-1")
        again = await inv.reserve("alice", [("case", 1), ("phone", 2)], request_id="r-1")
        assert again.replayed and again.hold_id == first.hold_id


async def test_a_refusal_is_not_remembered(redis_url: str) -> None:
    """Refusals changed nothing, so the same request id is decided afresh later."""
    async with open_sale(redis_url, "refusal") as inv:
        await inv.stock("phone", 1, reserve=1)
        with pytest.raises(SoldOut):
            await inv.reserve("alice", "phone", request_id="r-1")
        await inv.release_reserve("phone")
        hold = await inv.reserve("alice", "phone", request_id="r-1")
        assert not hold.replayed and hold.state is HoldState.HELD


async def test_confirm_and_release_are_idempotent(redis_url: str) -> None:
    async with open_sale(redis_url, "close") as inv:
        await inv.stock("phone", 5)
        a = await inv.reserve("alice", "phone", request_id="a")
        b = await inv.reserve("bob", "phone", request_id="b")
        for _ in range(3):
            assert (await inv.confirm(a.hold_id)).state is HoldState.PAID
            assert (await inv.release(b.hold_id)).state is HoldState.CANCELLED
        snap = await inv.snapshot("phone")
        assert snap is not None and (snap.available, snap.sold) == (4, 1)
        types = [e["type"] for e in await events(inv.redis, inv.keys)]
        assert types.count("confirmed") == 1 and types.count("released") == 1


# ----------------------------------------------------- redis-py's own re-send


def retrying_client(redis_url: str, **options: Any) -> Redis:
    """A client built with the ``Redis()`` constructor, whose default in redis-py 8.1 is
    ``Retry(ExponentialWithJitterBackoff(base=0.01, cap=1), 10)`` on ConnectionError and
    TimeoutError: a command that timed out is sent again on a new connection. (In 8.1
    ``Redis.from_url`` builds connections with no retry at all, so the URL is parsed here.)
    """
    parsed = parse_url(redis_url)
    wanted = {k: parsed[k] for k in ("host", "port", "db", "username", "password") if k in parsed}
    return Redis(**wanted, **options)


@asynccontextmanager
async def asleep(admin: Redis, seconds: float) -> AsyncIterator[None]:
    """Redis blocked in DEBUG SLEEP: commands sent meanwhile wait in the socket buffers
    and run when it wakes, even those whose client gave up and closed the connection."""
    sleeper = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", str(seconds)))
    await asyncio.sleep(0.1)  # the command has reached the server and it sleeps
    try:
        yield
    finally:
        await sleeper


def test_the_default_client_resends_on_timeout() -> None:
    """The premise of the tests below, checked on the installed redis-py."""
    client = retrying_client("redis://127.0.0.1:1/0")
    retry = client.get_retry()
    assert retry is not None and retry.get_retries() >= 1
    assert RedisTimeoutError in retry._supported_errors


@one_server_resend
@pytest.mark.parametrize("coalesce", [True, False])
async def test_script_resent_after_a_timeout_takes_stock_once(redis_url: str, coalesce: bool) -> None:
    """THE TIMEOUT-RESEND CASE. The reserve times out (socket_timeout 0.2 s, server asleep
    0.6 s); redis-py re-sends it; Redis later runs both copies. Stock goes down once, one
    reserved event, the caller gets the hold (or OutcomeUnknown, never a refusal), and a
    retry with the same request id returns that hold."""
    async with open_sale(redis_url, "resend") as inv:
        fast = retrying_client(redis_url, socket_timeout=0.2)
        try:
            engine = Inventory(fast, inv.sale, coalesce=coalesce)
            await engine.stock("phone", 10)
            await engine.load_scripts()  # no NOSCRIPT round trips in the counts below
            await engine.reserve("warm", "phone", request_id="warm")  # pool warm
            before = await evalsha_calls(inv.redis)
            async with asleep(inv.redis, 0.6):
                outcome: Any
                try:
                    outcome = await engine.reserve("alice", [("phone", 2)], request_id="r-1")
                except OutcomeUnknown as exc:
                    outcome = exc
            ran = await evalsha_calls(inv.redis) - before
            assert ran >= 2, f"the script ran {ran} time(s): nothing was re-sent, the test proves nothing"
            assert isinstance(outcome, OutcomeUnknown) or outcome.replayed, outcome
            snap = await inv.snapshot("phone")
            assert snap is not None and (snap.available, snap.held) == (7, 3)
            assert len(reserved_events(await events(inv.redis, inv.keys), "r-1")) == 1
            retry = await engine.reserve("alice", [("phone", 2)], request_id="r-1")
            assert retry.replayed
            if not isinstance(outcome, OutcomeUnknown):
                assert retry.hold_id == outcome.hold_id
            assert await audit_sale(inv.redis, inv.keys) == []
            await engine.aclose()
        finally:
            await fast.aclose()


@one_server_resend
async def test_batch_resent_after_a_timeout_takes_stock_once_per_request(redis_url: str) -> None:
    async with open_sale(redis_url, "resendb") as inv:
        fast = retrying_client(redis_url, socket_timeout=0.2)
        try:
            engine = Inventory(fast, inv.sale)
            await engine.load_scripts()
            await engine.stock("phone", 100)
            await engine.reserve("warm", "phone", request_id="warm")
            before = await evalsha_calls(inv.redis)
            async with asleep(inv.redis, 0.6):
                outcomes = await asyncio.gather(
                    *(engine.reserve(f"u{i % 20}", "phone", request_id=f"r-{i % 20}") for i in range(30)),
                    return_exceptions=True,
                )
            assert await evalsha_calls(inv.redis) - before >= 2
            assert all(isinstance(o, OutcomeUnknown) or not isinstance(o, BaseException) for o in outcomes), (
                outcomes
            )
            assert (await inv.snapshot("phone")).held == 1 + 20  # type: ignore[union-attr]
            log = await events(inv.redis, inv.keys)
            assert all(len(reserved_events(log, f"r-{i}")) == 1 for i in range(20))
            assert await audit_sale(inv.redis, inv.keys) == []
            await engine.aclose()
        finally:
            await fast.aclose()


@one_server_resend
async def test_restock_resent_after_a_timeout_is_applied_once(redis_url: str) -> None:
    """The same trap for stock changes: a re-sent restock must not add the units twice
    (extra units on sale that the warehouse does not have are an oversell)."""
    async with open_sale(redis_url, "resends") as inv:
        fast = retrying_client(redis_url, socket_timeout=0.2)
        try:
            engine = Inventory(fast, inv.sale)
            await engine.load_scripts()
            await engine.stock("phone", 10, reserve=4)
            before = await evalsha_calls(inv.redis)
            async with asleep(inv.redis, 0.6):
                snap = await engine.restock("phone", 5)
            assert await evalsha_calls(inv.redis) - before >= 2
            assert (snap.total, snap.available) == (15, 11)
            before = await evalsha_calls(inv.redis)
            async with asleep(inv.redis, 0.6):
                snap = await engine.release_reserve("phone", 3)
            assert await evalsha_calls(inv.redis) - before >= 2
            assert (snap.available, snap.reserve) == (14, 1)
            before = await evalsha_calls(inv.redis)
            async with asleep(inv.redis, 0.6):
                snap = await engine.stock("case", 7)  # a re-sent stock() is not SkuExists
            assert await evalsha_calls(inv.redis) - before >= 2
            assert snap.total == 7
            types = [e["type"] for e in await events(inv.redis, inv.keys)]
            assert types == ["stocked", "restocked", "reserve_released", "stocked"]
        finally:
            await fast.aclose()


@one_server_resend
async def test_outcome_unknown_when_redis_stays_silent_past_every_retry(redis_url: str) -> None:
    async with open_sale(redis_url, "silent") as inv:
        await inv.stock("phone", 10)
        paid = await inv.reserve("bob", "phone", request_id="r-bob")
        impatient = retrying_client(redis_url, socket_timeout=0.1, retry=Retry(NoBackoff(), 1))
        try:
            engine = Inventory(impatient, inv.sale, coalesce=False)
            await engine.snapshot("phone")  # connected before Redis falls asleep
            async with asleep(inv.redis, 1.0):
                with pytest.raises(OutcomeUnknown) as reserve_unknown:
                    await engine.reserve("alice", [("phone", 2)], request_id="r-1")
                with pytest.raises(OutcomeUnknown) as confirm_unknown:
                    await engine.confirm(paid.hold_id)
            assert reserve_unknown.value.code == confirm_unknown.value.code == "outcome_unknown"
            assert "request id" in str(reserve_unknown.value)
            # Redis ran what was buffered once it woke: the retry learns the outcome.
            retry = await engine.reserve("alice", [("phone", 2)], request_id="r-1")
            assert (await engine.confirm(paid.hold_id)).state is HoldState.PAID
            snap = await inv.snapshot("phone")
            assert snap is not None and (snap.held, snap.sold) == (2, 1)
            assert len(reserved_events(await events(inv.redis, inv.keys), "r-1")) == 1
            assert retry.state is HoldState.HELD
            assert await audit_sale(inv.redis, inv.keys) == []
        finally:
            await impatient.aclose()


# ------------------------------------------------------- one id, two buyers


def same_home(inv: BucketedInventory, user: str) -> str:
    """Another buyer whose home bucket is ``user``'s (so both meet the same requests hash)."""
    home = inv.home(user)
    return next(f"mallory{i}" for i in range(1000) if inv.home(f"mallory{i}") is home)


@pytest.mark.parametrize("buckets", [0, 3], ids=["plain", "bucketed"])
async def test_request_ids_are_scoped_per_buyer(redis_url: str, buckets: int) -> None:
    """A buyer who sends ``alice-1`` first neither blocks Alice's own ``alice-1`` nor
    learns anything about it: each buyer's request ids are their own."""
    async with connect(redis_url) as client:
        sale = new_sale_id("scope")
        inv: Inventory | BucketedInventory = (
            BucketedInventory(client, sale, buckets) if buckets else Inventory(client, sale)
        )
        mallory = same_home(inv, "alice") if isinstance(inv, BucketedInventory) else "mallory"
        try:
            await inv.stock("phone", 9, limit_per_user=2)
            theirs = await inv.reserve(mallory, [("phone", 1)], request_id="alice-1")
            mine = await inv.reserve("alice", [("phone", 2)], request_id="alice-1")
            assert not mine.replayed and mine.hold_id != theirs.hold_id and mine.user == "alice"
            # Each buyer's retry still finds their own first outcome.
            again = await inv.reserve("alice", [("phone", 2)], request_id="alice-1")
            assert again.replayed and again.hold_id == mine.hold_id
            replay = await inv.reserve(mallory, [("phone", 1)], request_id="alice-1")
            assert replay.replayed and replay.hold_id == theirs.hold_id
            # Asking past the limit answers the same for a taken id and a fresh one.
            for request_id in ("alice-1", "never-used"):
                with pytest.raises(LimitExceeded):
                    await inv.reserve("eve", [("phone", 3)], request_id=request_id)
            # Alice changing her cart under her own id is still a conflict, naming her hold.
            with pytest.raises(RequestConflict) as conflict:
                await inv.reserve("alice", [("phone", 1)], request_id="alice-1")
            assert conflict.value.details["hold_id"] == mine.hold_id
            snap = await inv.snapshot("phone")
            assert snap is not None and (snap.held, snap.available) == (3, 6)
            # The records sit where SaleKeys says (recovery rebuilds them there).
            for user, hold in (("alice", mine), (mallory, theirs)):
                part = inv.home(user) if isinstance(inv, BucketedInventory) else inv
                raw = await client.hget(part.keys.requests, SaleKeys.request_field(user, "alice-1"))
                assert raw is not None and json.loads(raw)["h"] == hold.hold_id
        finally:
            await inv.aclose()
            for part in inv.buckets if isinstance(inv, BucketedInventory) else [inv]:
                await drop_sale(client, part.keys)
