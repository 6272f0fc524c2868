"""Recovery: rebuild a sale in Redis from PostgreSQL after Redis lost data, then reopen it
(what ``flashsale recover`` runs).

For each sale to recover (the fenced ones, the ones :func:`flashsale.fence.verify.verify` finds
lost, or those named), and for each of its engine sales (the sale, or each bucket
``<sale>-b<k>`` of a buckets-split sale):

1. **fence** it (if a guard has not already), so no order is taken meanwhile;
2. **drain** the sale's stream — every entry still in it, not only the unacknowledged
   ones — into PostgreSQL with the order writer's own idempotent statement, so whatever
   Redis still knows that PostgreSQL does not is kept (a hold made just before the loss);
3. **rebuild** from PostgreSQL, in one MULTI guarded by WATCH on the stream, the holds and
   their hashes: stock counters per SKU (total and reserve pool from the stock events;
   held and sold from the orders; available = total − reserve − held − sold), hold
   records, idempotency records for every (buyer, request id) (so a buyer's retry still
   gets its first outcome), per-user counts, payment deadlines. Stock-change operation ids
   and unfinished bucket transfers already in Redis are kept, and each bucket transfer's
   operation records (``op:xo-<id>`` / ``op:xi-<id>``) are rebuilt from the transfer ids
   on the stock events: a transfer the loss cut is then finished by the settle step, its
   units neither dropped (the donor's record lost) nor added twice (the receiver's). If
   anything wrote to the stream after step 2 (a sweeper, a late reservation), WATCH
   fails and 2–3 run again;
4. move the stream's last id up to what PostgreSQL has committed (``XSETID``), so new
   entries sort after everything already written;

then put back the sale's settings (from ``fence_sales`` if Redis lost them or holds
another generation), its SKU index and its place in the sales set, clear ``fenced``, bump
the sale's epoch (every process drops its sold-out cache), re-write the lineage marker,
log ``recovered`` in ``fence_log``, and verify again.

Only the generation being rebuilt is read from PostgreSQL (the one recorded last; a sale id
used again has the rows of its earlier creations there too, see
:mod:`flashsale.fence.verify`). A sale created again over a generation never retired is
not rebuilt: that would overwrite the new creation; it is reported instead.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from redis.exceptions import WatchError

from flashsale.fence import verify as fence
from flashsale.keys import ServiceKeys
from flashsale.ledger import order_timing, read_sales
from flashsale.pipeline.entries import EntryError, StreamEntry, parse_entry
from flashsale.pipeline.order_sql import write_changes
from flashsale.redis_client import as_text
from flashsale.streams import ensure_group
from inventory import SaleKeys, StreamId

__all__ = ["RecoveryError", "RecoveryReport", "SaleRecovery", "SkuRebuilt", "forget", "recover"]

_CHUNK = 1000
_MAX_ATTEMPTS = 20


class RecoveryError(RuntimeError):
    """A sale could not be rebuilt (the message says why and what to do)."""


def _ms(ts: Any) -> int:
    return int(round(ts.timestamp() * 1000))


@dataclass(frozen=True, slots=True)
class SkuRebuilt:
    engine_sale: str
    sku: str
    total: int
    available: int
    held: int
    sold: int
    reserve: int


@dataclass(frozen=True, slots=True)
class SaleRecovery:
    sale: str
    engine_sales: tuple[str, ...]
    reason: str
    drained: int  # stream entries written to PostgreSQL before the rebuild
    orders: dict[str, int]  # status -> orders restored
    skus: tuple[SkuRebuilt, ...]
    attempts: int
    settings_restored: bool
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    prefix: str
    before: tuple[str, ...]  # what verification found before (one line per loss)
    recovered: tuple[SaleRecovery, ...]
    after: tuple[str, ...]  # what verification still finds (must be empty)
    duration_s: float
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.after and not self.problems and not any(r.problems for r in self.recovered)

    def to_json(self) -> dict[str, Any]:
        return {"schema": "flashsale.recovery/1", "ok": self.ok, **asdict(self)}

    def table(self) -> str:
        out = [f"flashsale recover (prefix {self.prefix}), {self.duration_s:.2f} s"]
        out += ["found: " + line for line in self.before] or ["found: Redis agrees with PostgreSQL"]
        head = ("sale", "engine sale", "sku", "total", "avail", "held", "sold", "reserve")
        rows: list[tuple[Any, ...]] = [head]
        for r in self.recovered:
            orders = ", ".join(f"{k} {v}" for k, v in sorted(r.orders.items())) or "none"
            out.append(
                f"rebuilt {r.sale}: {r.drained} stream entries drained first, orders {orders}, "
                f"{r.attempts} attempt(s){', settings restored' if r.settings_restored else ''}"
            )
            rows += [
                (r.sale, s.engine_sale, s.sku, s.total, s.available, s.held, s.sold, s.reserve)
                for s in r.skus
            ]
            out += [f"  problem: {p}" for p in r.problems]
        if len(rows) > 1:
            widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
            out += [
                "  ".join(
                    str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))
                )
                for row in rows
            ]
        out += [f"problem: {p}" for p in self.problems]
        out += ["still wrong: " + line for line in self.after]
        out.append(
            "RECOVERED: sales reopened"
            if self.ok and self.recovered
            else "NOTHING TO RECOVER"
            if self.ok
            else "RECOVERY INCOMPLETE"
        )
        return "\n".join(out)


# ------------------------------------------------------------------ draining
async def _drain(redis: Any, pool: Any, prefix: str, engine: str, after: str) -> tuple[int, str, list[str]]:
    """Write every stream entry after ``after`` to PostgreSQL; return (entries, last id, problems)."""
    key = SaleKeys(prefix, engine).events
    written, last = 0, after
    problems: list[str] = []
    while True:
        start = "-" if last == "0-0" else "(" + last
        batch = await redis.xrange(key, start, "+", count=_CHUNK)
        if not batch:
            return written, last, problems
        changes = []
        for stream_id, fields in batch:
            entry = StreamEntry(
                engine, key, as_text(stream_id), {as_text(k): as_text(v) for k, v in fields.items()}
            )
            try:
                changes.extend(parse_entry(entry))  # a reservation call's entry: one per hold
            except EntryError as exc:
                problems.append(f"{engine} entry {entry.stream_id} skipped: {exc}")
        if changes:
            async with pool.acquire() as conn:
                await write_changes(conn, changes)
        written += len(batch)
        last = as_text(batch[-1][0])


# --------------------------------------------------------------- the rebuild
@dataclass(slots=True)
class _Plan:
    stock: dict[str, str]
    holds: dict[str, str]
    requests: dict[str, str]
    users: dict[str, int]
    deadlines: dict[str, int]
    top_id: str  # the newest stream id PostgreSQL has committed
    orders: Counter[str]
    skus: list[SkuRebuilt]
    problems: list[str]
    skus_seen: set[str]


async def _plan(pool: Any, engine: str, generation: int) -> _Plan:
    records = (await read_sales(pool, [engine])).since(generation)
    orders, by_order = records.orders, records.lines
    counters: dict[str, dict[str, int]] = defaultdict(
        lambda: dict.fromkeys(("total", "reserve", "limit", "low", "held", "sold"), 0)
    )
    for (_, sku), recorded in records.stock().items():
        counters[sku].update(
            total=recorded.total, reserve=recorded.reserve, limit=recorded.limit, low=recorded.low
        )
    problems: list[str] = []
    top = max((StreamId.parse(e["stream_id"]) for e in records.events), default=StreamId(0, 0))
    requests: dict[str, str] = {}
    for e in records.events:
        if e["transfer"] is not None:  # the records transfer_out / transfer_in keep
            side = "xo" if e["delta"] < 0 else "xi"
            requests[f"op:{side}-{e['transfer']}"] = f"adjust {e['sku']} {e['delta']}"
    holds: dict[str, str] = {}
    users: Counter[str] = Counter()
    deadlines: dict[str, int] = {}
    statuses: Counter[str] = Counter()
    for o in orders:
        order_id, status = o["order_id"], o["status"]
        cart = sorted(by_order.get(order_id, []))
        if not cart:
            problems.append(f"order {order_id} has no lines in PostgreSQL; left out")
            continue
        top = max(top, StreamId.parse(o["last_stream_id"]))
        statuses[status] += 1
        deadline = _ms(o["pay_by"])
        created = _ms(o["created_at"] or o["status_at"])
        record: dict[str, Any] = {
            "u": o["user_id"],
            "l": [[sku, qty] for sku, qty in cart],
            "s": status,
            "d": str(deadline),
            "c": str(created),
            "r": o["request_id"],
        }
        if status != "held":
            record["t"] = str(_ms(o["status_at"]))
        holds[order_id] = json.dumps(record, separators=(",", ":"))
        # The reserve script's fingerprint: user, then each line of the (sorted) cart.
        fingerprint = o["user_id"] + "".join(f"|{sku}:{qty}" for sku, qty in cart)
        requests[SaleKeys.request_field(o["user_id"], o["request_id"])] = json.dumps(
            {"h": order_id, "f": fingerprint}, separators=(",", ":")
        )
        if status in ("held", "paid"):
            for sku, qty in cart:
                users[f"{o['user_id']}:{sku}"] += qty
                counters[sku]["held" if status == "held" else "sold"] += qty
        if status == "held":
            deadlines[order_id] = deadline
    stock: dict[str, str] = {}
    skus: list[SkuRebuilt] = []
    for sku, c in sorted(counters.items()):
        available = c["total"] - c["reserve"] - c["held"] - c["sold"]
        if available < 0:
            problems.append(
                f"{engine}/{sku}: PostgreSQL already has {-available} unit(s) more held or sold than "
                "stocked (an oversell from before this recovery); available set to 0"
            )
            available = 0
        values = {
            "total": c["total"],
            "available": available,
            "held": c["held"],
            "sold": c["sold"],
            "reserve": c["reserve"],
            "limit": c["limit"],
            "low": c["low"],
        }
        stock.update({f"{sku}:{name}": str(v) for name, v in values.items()})
        skus.append(SkuRebuilt(engine, sku, c["total"], available, c["held"], c["sold"], c["reserve"]))
    return _Plan(
        stock,
        holds,
        requests,
        dict(users),
        deadlines,
        str(top),
        statuses,
        skus,
        problems,
        set(counters),
    )


async def _last_generated(redis: Any, key: str) -> str:
    return as_text((await redis.xinfo_stream(key)).get("last-generated-id") or "0-0")


async def _rebuild_engine(
    redis: Any, pool: Any, prefix: str, engine: str, generation: int
) -> tuple[int, _Plan, int]:
    """Drain then rebuild one engine sale's ``generation``; returns (entries drained, plan,
    attempts)."""
    keys = SaleKeys(prefix, engine)
    await ensure_group(redis, keys.events)  # the stream must exist to be watched (and for the writer)
    drained, problems = 0, []
    last = "0-0"
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        seen = await _last_generated(redis, keys.events)
        n, last, found = await _drain(redis, pool, prefix, engine, last)
        drained += n
        problems += found
        plan = await _plan(pool, engine, generation)
        async with redis.pipeline(transaction=True) as pipe:
            await pipe.watch(keys.events, keys.holds, keys.stock, keys.requests)
            if await _last_generated(pipe, keys.events) != seen:
                continue  # written to since the drain began: drain again
            kept = {
                as_text(k): as_text(v)
                for k, v in (await pipe.hgetall(keys.requests)).items()
                if as_text(k).startswith(("op:", "xfer:"))
            }
            target = max(StreamId.parse(seen), StreamId.parse(plan.top_id))
            pipe.multi()
            pipe.delete(keys.stock, keys.holds, keys.requests, keys.users, keys.deadlines)
            if plan.stock:
                pipe.hset(keys.stock, mapping=plan.stock)
            for mapping in (plan.holds, {**kept, **plan.requests}, plan.users):
                key = (
                    keys.holds
                    if mapping is plan.holds
                    else keys.users
                    if mapping is plan.users
                    else keys.requests
                )
                items = list(mapping.items())
                for i in range(0, len(items), _CHUNK):
                    pipe.hset(key, mapping=dict(items[i : i + _CHUNK]))
            deadlines = list(plan.deadlines.items())
            for i in range(0, len(deadlines), _CHUNK):
                pipe.zadd(keys.deadlines, dict(deadlines[i : i + _CHUNK]))
            pipe.execute_command("XSETID", keys.events, str(target))
            try:
                await pipe.execute()
            except WatchError:
                continue
        plan.problems[:0] = problems
        return drained, plan, attempt
    raise RecoveryError(
        f"{engine}: the stream kept changing while rebuilding ({_MAX_ATTEMPTS} attempts); "
        "stop the service processes that ignore the fence, then run `flashsale recover` again"
    )


async def _derived_settings(pool: Any, engines: list[str], generation: int) -> dict[str, Any]:
    """Settings for a sale ``fence_sales`` never recorded, read off its orders."""
    ttl_s, first = await order_timing(pool, engines, generation)
    ttl_ms = int(ttl_s * 1000) if ttl_s is not None else 1_800_000
    opens = _ms(first) if first is not None else 0
    return {
        "opens_at_ms": opens,
        "early_access_ms": 0,
        "hold_ttl_ms": max(ttl_ms, 50),
        "state": "open",
        "buckets": len(engines) if len(engines) > 1 else 1,
    }


async def _reopen(redis: Any, pool: Any, prefix: str, record: fence.SaleRecord, skus: set[str]) -> bool:
    """Put back the sale's settings, SKU index and sales-set entries; clear ``fenced``.
    Returns True if the settings hash had to be restored (lost, or another generation's)."""
    key = ServiceKeys(prefix).sale(record.sale)
    held = await redis.hmget(key, ["opens_at_ms", "generation"])
    restored = held[0] is None or int(held[1] or 0) != record.generation
    settings = (
        record.settings
        if record.settings.get("opens_at_ms") is not None
        else {**await _derived_settings(pool, record.engine_sales, record.generation), **record.settings}
    )
    if restored:
        await redis.hset(
            key,
            mapping={
                **{
                    k: settings.get(k, d)
                    for k, d in (
                        ("opens_at_ms", 0),
                        ("early_access_ms", 0),
                        ("hold_ttl_ms", 1_800_000),
                        ("state", "open"),
                        ("buckets", 1),
                    )
                },
                "epoch": 0,
                "generation": record.generation,
            },
        )
    if skus:
        await redis.hset(ServiceKeys(prefix).skus, mapping=dict.fromkeys(sorted(skus), record.sale))
    await redis.sadd(
        ServiceKeys(prefix).sales, record.sale, *(e for e in record.engine_sales if e != record.sale)
    )
    await redis.hset(key, "fenced", "")
    await redis.hincrby(key, "epoch", 1)
    return restored


# --------------------------------------------------------------------- entry
async def recover(
    redis: Any,
    pool: Any,
    *,
    prefix: str = "fs",
    sales: list[str] | None = None,
    force: bool = False,
) -> RecoveryReport:
    """Rebuild and reopen sales (see the module docstring).

    Which: ``sales`` if given; else every sale the fence finds lost or that is fenced;
    ``force`` rebuilds every recorded sale even if it verifies. ``redis`` must be a client
    with ``decode_responses=True`` that no fence guard hooks; ``pool`` an asyncpg pool.
    """
    started = time.monotonic()
    before = await fence.verify(redis, pool, prefix=prefix)
    lost = before.lost_sales()
    registry = dict(before.registry)
    targets: dict[str, str] = {}
    if sales:
        targets = {s: lost.get(s, "recovery requested by an operator") for s in sales}
    else:
        targets = dict(lost)
        for sale in sorted(as_text(m) for m in await redis.smembers(ServiceKeys(prefix).sales)):
            reason = await redis.hget(ServiceKeys(prefix).sale(sale), "fenced")
            if reason:
                targets.setdefault(sale, as_text(reason))
        if force:
            for sale, rec in registry.items():
                if not rec.forgotten:
                    targets.setdefault(sale, "rebuild forced by an operator")
    recovered: list[SaleRecovery] = []
    problems: list[str] = []
    rebuilt_sales: list[tuple[fence.SaleRecord, set[str], bool, SaleRecovery]] = []
    for sale, reason in sorted(targets.items()):
        engines = sorted({e for e, p in before.parents.items() if p == sale})
        record = registry.get(sale) or fence.SaleRecord(
            sale, {"buckets": len(engines) if len(engines) > 1 else 1}, ()
        )
        held = before.generations.get(sale)
        if held is not None and held > record.generation:
            if sale in registry and not record.forgotten:
                problems.append(
                    f"{sale}: Redis holds a newer creation (generation {held}) than the one recorded "
                    f"({record.generation}), which was never retired; not rebuilt (that would overwrite "
                    f"the new one): run `flashsale recover --forget {sale}` if the old one was removed on purpose"
                )
                continue
            record = replace(record, generation=held)  # created again, not recorded yet: rebuild that one
        if not engines:
            engines = record.engine_sales
        if record.engine_sales != engines and sale not in registry:
            problems.append(
                f"{sale}: engine sales {engines} do not match its bucket count; rebuilt what PostgreSQL has"
            )
        lost_settings = not await redis.hexists(ServiceKeys(prefix).sale(sale), "opens_at_ms")
        await fence.raise_fence(redis, pool, prefix=prefix, record=record, reason=f"recovering: {reason}")
        drained, attempts = 0, 0
        orders: Counter[str] = Counter()
        rebuilt: list[SkuRebuilt] = []
        sale_problems: list[str] = []
        skus: set[str] = set(record.skus)
        for engine in engines:
            n, plan, tries = await _rebuild_engine(redis, pool, prefix, engine, record.generation)
            drained += n
            attempts = max(attempts, tries)
            orders.update(plan.orders)
            rebuilt += plan.skus
            sale_problems += plan.problems
            skus |= plan.skus_seen
        summary = SaleRecovery(
            sale,
            tuple(engines),
            reason,
            drained,
            dict(orders),
            tuple(rebuilt),
            attempts,
            lost_settings,
            tuple(sale_problems),
        )
        rebuilt_sales.append((record, skus, lost_settings, summary))
    # The lineage marker goes back before any sale reopens: a guard verifying in between
    # would otherwise find it missing and fence the sale again.
    if rebuilt_sales or before.ok:
        await fence.ensure_lineage(redis, pool, prefix=prefix)
    for record, skus, lost_settings, summary in rebuilt_sales:
        restored = await _reopen(redis, pool, prefix, record, skus) or lost_settings
        if restored != summary.settings_restored:
            summary = SaleRecovery(**{**asdict(summary), "skus": summary.skus, "settings_restored": restored})
        await fence.log_fence(
            pool,
            prefix=prefix,
            sale=summary.sale,
            action="recovered",
            reason=summary.reason,
            detail={
                "drained": summary.drained,
                "orders": summary.orders,
                "attempts": summary.attempts,
                "settings_restored": restored,
                "problems": list(summary.problems),
            },
        )
        recovered.append(summary)
    if recovered or before.ok:
        await fence.record_sales(redis, pool, prefix=prefix, known=registry)
    after = await fence.verify(redis, pool, prefix=prefix)
    return RecoveryReport(
        prefix=prefix,
        before=tuple(loss.reason for loss in before.losses),
        recovered=tuple(recovered),
        after=tuple(loss.reason for loss in after.losses),
        duration_s=time.monotonic() - started,
        problems=tuple(problems),
    )


async def forget(pool: Any, *, prefix: str, sale: str) -> bool:
    """Tell the fence a sale was removed from Redis on purpose (its absence is no loss): its
    generations recorded so far are retired, and the id may be created again (a new
    generation, fenced like any sale)."""
    async with pool.acquire() as conn:
        known = await conn.fetchval(
            "SELECT count(*) FROM fence_sales WHERE prefix = $1 AND sale = $2", prefix, sale
        )
        await conn.execute(
            "UPDATE fence_sales SET forgotten_at = now() WHERE prefix = $1 AND sale = $2 AND forgotten_at IS NULL",
            prefix,
            sale,
        )
    if not known:
        return False
    await fence.log_fence(
        pool, prefix=prefix, sale=sale, action="forgotten", reason="removed from Redis on purpose"
    )
    return True
