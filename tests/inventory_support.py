"""What the inventory tests share: a fresh sale per test, a byte-exact dump of a sale's
keys, the events stream as one dict per change, an audit of a sale's invariants read straight from
Redis, and the worker functions that spawned processes run (they must live in an
importable module, not in a test file)."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis_mode import CappedCluster, on_cluster

from inventory import (
    HoldCancelled,
    HoldExpired,
    HoldPaid,
    Inventory,
    OutcomeUnknown,
    SaleKeys,
    SoldOut,
)

CLOSING_EVENTS = {"paid": "confirmed", "cancelled": "released", "expired": "expired"}
HOLD_EVENTS = {"reserved", *CLOSING_EVENTS.values()}


def new_sale_id(tag: str) -> str:
    """A sale id no other test uses (tests share one Redis)."""
    return f"{tag}-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def connect(redis_url: str, *, max_connections: int = 32) -> AsyncIterator[Redis]:
    """A client of our own whose callers wait for a free connection. (redis-py 8.1's
    default pool holds 100 connections and raises MaxConnectionsError beyond that, which
    hundreds of concurrent confirms would hit.) On a Redis Cluster (FLASHSALE_TEST_REDIS=cluster)
    a cluster client whose callers wait the same way."""
    if on_cluster():
        cluster = CappedCluster.from_url(redis_url, cap=max_connections, max_connections=max_connections + 8)
        await cluster.initialize()  # redis-py 8.1 breaks commands that race a cold client's first use
        client = cast(Redis, cluster)
    else:
        client = Redis.from_pool(
            BlockingConnectionPool.from_url(redis_url, max_connections=max_connections, timeout=60)
        )
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def open_sale(redis_url: str, tag: str, **options: Any) -> AsyncIterator[Inventory]:
    """An Inventory on a new sale and its own client; the sale's keys are deleted after."""
    async with connect(redis_url, max_connections=options.pop("max_connections", 32)) as client:
        inv = Inventory(client, new_sale_id(tag), **options)
        try:
            yield inv
        finally:
            await inv.aclose()
            await drop_sale(client, inv.keys)


async def drop_sale(client: Redis, keys: SaleKeys) -> None:
    await client.delete(*keys.all())


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def dump_sale(client: Redis, keys: SaleKeys) -> dict[bytes, tuple[Any, ...]]:
    """Every key in the sale's hash tag (not only the six the engine knows about), read by
    type: type, encoding, TTL and the full content; for the stream also its length, last
    id and entries-added counter. (DUMP payloads are not stable: a read of a hash that is
    being rehashed changes its order, not its content.)"""
    out: dict[bytes, tuple[Any, ...]] = {}
    async for key in client.scan_iter(match=_glob_escape(keys.tag) + "*", count=1000):
        kind = _text(await client.type(key))
        head = (kind, await client.object("encoding", key), await client.pttl(key))
        if kind == "hash":
            out[key] = (*head, sorted((await client.hgetall(key)).items()))
        elif kind == "zset":
            out[key] = (*head, await client.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            info = await client.xinfo_stream(key)
            stats = tuple(info.get(name) for name in ("length", "last-generated-id", "radix-tree-keys"))
            out[key] = (*head, stats, await client.xrange(key))
        else:
            out[key] = (*head, await client.dump(key))
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def events(client: Redis, keys: SaleKeys) -> list[dict[str, str]]:
    """The sale's event stream, oldest first, fields decoded: one dict per change, so each
    hold of a ``reserved_batch`` entry is the ``reserved`` entry it stands for (read here by
    hand from the contract's packed form, not by the parser under test)."""
    changes: list[dict[str, str]] = []
    for _, raw in await client.xrange(keys.events):
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if fields["type"] != "reserved_batch":
            changes.append(fields)
            continue
        for hold_id, packed in fields.items():
            if hold_id not in ("type", "at"):
                user, lines, request, deadline = packed.split(" ")
                changes.append(
                    {
                        "type": "reserved",
                        "order": hold_id,
                        "user": user,
                        "lines": lines,
                        "request": request,
                        "deadline": deadline,
                        "at": fields["at"],
                    }
                )
    return changes


async def hold_records(client: Redis, keys: SaleKeys) -> dict[str, dict[str, Any]]:
    raw = await client.hgetall(keys.holds)
    return {_text(k): json.loads(v) for k, v in raw.items()}


async def audit_sale(client: Redis, keys: SaleKeys) -> list[str]:
    """Every invariant of a sale that can be read from Redis; returns the violations.

    Conservation per SKU; the held counter equals the lines of holds in state held; each
    buyer's count equals the lines of their held and paid holds and stays within the limit;
    the deadlines zset lists exactly the held holds; the stream has one "reserved" entry
    per hold and one closing entry per closed hold, of the type of its state.
    """
    problems: list[str] = []
    stock_raw = await client.hgetall(keys.stock)
    stock: dict[str, dict[str, int]] = {}
    for field, value in stock_raw.items():
        sku, _, name = _text(field).rpartition(":")
        stock.setdefault(sku, {})[name] = int(value)
    holds = await hold_records(client, keys)
    held: Counter[str] = Counter()
    counted: Counter[str] = Counter()
    for rec in holds.values():
        for sku, qty in rec["l"]:
            if rec["s"] == "held":
                held[sku] += int(qty)
            if rec["s"] in ("held", "paid"):
                counted[f"{rec['u']}:{sku}"] += int(qty)
    for sku, c in stock.items():
        terms = (c["available"], c["held"], c["sold"], c["reserve"])
        if any(t < 0 for t in terms) or sum(terms) != c["total"]:
            problems.append(f"{sku}: not conserved {c}")
        if c["held"] != held[sku]:
            problems.append(f"{sku}: held counter {c['held']} != {held[sku]} in held holds")
    users = {_text(k): int(v) for k, v in (await client.hgetall(keys.users)).items()}
    if users != {k: v for k, v in counted.items() if v}:
        problems.append(f"per-user counts {users} != holds say {dict(counted)}")
    for user_sku, n in users.items():
        sku = user_sku.rpartition(":")[2]
        limit = stock.get(sku, {}).get("limit", 0)
        if limit and n > limit:
            problems.append(f"{user_sku}: {n} over the limit {limit}")
    due = {_text(m) for m in await client.zrange(keys.deadlines, 0, -1)}
    open_holds = {h for h, rec in holds.items() if rec["s"] == "held"}
    if due != open_holds:
        problems.append(f"deadlines zset {sorted(due ^ open_holds)} differ from held holds")
    per_hold: dict[str, list[str]] = {}
    for event in await events(client, keys):
        if event["type"] in HOLD_EVENTS:
            per_hold.setdefault(event["order"], []).append(event["type"])
    for hold_id, rec in holds.items():
        want = ["reserved"] + ([CLOSING_EVENTS[rec["s"]]] if rec["s"] != "held" else [])
        if per_hold.get(hold_id) != want:
            problems.append(f"hold {hold_id} ({rec['s']}): events {per_hold.get(hold_id)} != {want}")
    for hold_id in per_hold.keys() - holds.keys():
        problems.append(f"events for a hold that does not exist: {hold_id}")
    replayed = await replay_events(client, keys)
    for sku, c in stock.items():
        mine = {k: c[k] for k in ("total", "available", "held", "sold", "reserve")}
        if replayed.get(sku) != mine:
            problems.append(f"{sku}: replaying the events gives {replayed.get(sku)}, Redis has {mine}")
    return problems


async def replay_events(client: Redis, keys: SaleKeys) -> dict[str, dict[str, int]]:
    """Every SKU's counters rebuilt from the event stream alone (what the drain into
    PostgreSQL relies on: the stream tells the whole story)."""
    counters: dict[str, dict[str, int]] = {}

    def move(sku: str, **deltas: int) -> None:
        row = counters.setdefault(sku, dict.fromkeys(("total", "available", "held", "sold", "reserve"), 0))
        for name, delta in deltas.items():
            row[name] += delta

    for e in await events(client, keys):
        kind = e["type"]
        if kind == "stocked":
            total, reserve = int(e["total"]), int(e["reserve"])
            move(e["sku"], total=total, available=total - reserve, reserve=reserve)
        elif kind in ("restocked", "written_off"):
            move(e["sku"], total=int(e["delta"]), available=int(e["delta"]))
        elif kind == "reserve_released":
            move(e["sku"], reserve=-int(e["units"]), available=int(e["units"]))
        else:
            for part in e["lines"].split(","):
                sku, _, qty_text = part.rpartition(":")
                qty = int(qty_text)
                if kind == "reserved":
                    move(sku, available=-qty, held=qty)
                elif kind == "confirmed":
                    move(sku, held=-qty, sold=qty)
                else:  # released, expired
                    move(sku, held=-qty, available=qty)
    return counters


# ------------------------------------------------------ spawned-process workers
# Each runs in a fresh interpreter (multiprocessing "spawn") with its own event loop and
# client, and returns plain data the parent can check. The workers and the parent meet
# twice at one barrier, the start line: "ready" (every process up and connected, however
# long spawning took on a busy machine), then "go" (after the parent set the scene).

_start_line: Any = None


def join_start_line(barrier: Any) -> None:
    """The ProcessPoolExecutor initializer: keep the barrier shared with the parent."""
    global _start_line
    _start_line = barrier


def cross_start_line() -> None:
    """In a worker: wait for everyone at "ready", then at "go". (The parent calls
    ``barrier.wait()`` twice too, doing its setup in between.)"""
    for _ in ("ready", "go"):
        _start_line.wait(timeout=60)


def reserve_worker(redis_url: str, sale: str, sku: str, worker: int, tasks: int) -> dict[str, Any]:
    """``tasks`` concurrent one-unit reservations of ``sku``; returns the holds made and
    how many were refused as sold out (anything else is an error)."""

    async def run() -> dict[str, Any]:
        async with connect(redis_url, max_connections=16) as client:
            inv = Inventory(client, sale, coalesce=worker % 2 == 0)

            async def one(i: int) -> str | None:
                try:
                    return (await inv.reserve(f"w{worker}u{i}", sku, request_id=f"w{worker}r{i}")).hold_id
                except SoldOut:
                    return None

            await inv.load_scripts()  # connected and ready before the start
            cross_start_line()
            results = await asyncio.gather(*(one(i) for i in range(tasks)))
            await inv.aclose()
        return {"holds": [h for h in results if h], "sold_out": results.count(None)}

    return asyncio.run(run())


def close_worker(redis_url: str, sale: str, action: str, seed: int = 0) -> dict[str, str]:
    """Races the other workers on every hold of the sale (made by the parent between
    "ready" and "go"): ``action`` is confirm, release or sweep. Confirm and release are launched one every 2 ms in a shuffled order, so over
    the run they meet the other worker and the deadlines at every possible moment.
    Returns hold id -> what this worker saw ("paid", "cancelled", "expired", "hold_paid",
    "hold_cancelled", "hold_expired", "unknown")."""

    async def run() -> dict[str, str]:
        async with connect(redis_url, max_connections=8) as client:
            inv = Inventory(client, sale)
            seen: dict[str, str] = {}
            await inv.load_scripts()
            cross_start_line()
            hold_ids = sorted(h.decode() for h in await client.hkeys(inv.keys.holds))
            if action == "sweep":
                await sweep_until_empty(inv, seen)
                return seen
            call = inv.confirm if action == "confirm" else inv.release

            async def one(hold_id: str) -> None:
                try:
                    seen[hold_id] = (await call(hold_id)).state.value
                except (HoldPaid, HoldCancelled, HoldExpired) as exc:
                    seen[hold_id] = exc.code
                except OutcomeUnknown:
                    seen[hold_id] = "unknown"

            order = list(hold_ids)
            random.Random(seed).shuffle(order)
            calls = []
            for hold_id in order:
                calls.append(asyncio.create_task(one(hold_id)))
                await asyncio.sleep(0.002)
            await asyncio.gather(*calls)
            return seen

    return asyncio.run(run())


async def sweep_until_empty(inv: Inventory, seen: dict[str, str], *, give_up_after: float = 20.0) -> None:
    """The sweeper, run flat out until no hold is open; records what it expired."""
    deadline = time.monotonic() + give_up_after
    while time.monotonic() < deadline:
        for hold_id in (await inv.expire_due(limit=50)).expired:
            assert hold_id not in seen, f"{hold_id} expired twice"
            seen[hold_id] = "expired"
        if not await inv.redis.zcard(inv.keys.deadlines):
            return
        await asyncio.sleep(0.001)
    raise AssertionError("holds still open long after their deadlines")


class PausedTransfer:
    """Holds a live transfer between its intent and the donor's write-off (the window a
    settle step must not judge by a clock), and can make its process die after the
    write-off, before the receiver's add."""

    def __init__(
        self, monkeypatch: Any, source: Inventory, target: Inventory, *, crash: bool = False
    ) -> None:
        self.at_donor, self.go = asyncio.Event(), asyncio.Event()
        self.crash = crash
        real = Inventory._mutate

        async def mutate(inv: Inventory, script: str, *args: Any, **kw: Any) -> Any:
            if inv is source and not self.at_donor.is_set():
                self.at_donor.set()
                await self.go.wait()
            elif inv is target and self.crash and script in ("adjust", "transfer_in"):
                self.crash = False  # only the transferring process dies
                raise RuntimeError("process killed before the receiver's add")
            return await real(inv, script, *args, **kw)

        monkeypatch.setattr(Inventory, "_mutate", mutate)
