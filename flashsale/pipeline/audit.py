"""The audit: after a sale (or a drill), prove that Redis and PostgreSQL tell the same story
and that nothing was oversold, lost, written twice or stranded.

:func:`run_audit` takes one consistent snapshot of each sale in Redis (stock counters and
hold records read in one MULTI, with the stream's last id), waits until the order writer
has committed every stream entry up to that id (or gives up after ``wait_drain_s`` and
says so), reads PostgreSQL in one REPEATABLE READ transaction, and compares:

=================  ==========================================================================
kind               what it means (every one must be zero)
=================  ==========================================================================
oversold           units sold + held beyond the units stocked, per SKU: from Redis's
                   counters, from its hold records, and from PostgreSQL's orders and stock
                   events
lost               an order Redis holds, or a client was acknowledged (``acknowledged``), that
                   PostgreSQL does not have — or that Redis does not have
duplicate          two orders for one (sale, buyer, request id), in PostgreSQL or in Redis
conflict           an order whose status, buyer, request id or lines differ between Redis and
                   PostgreSQL
phantom            an order PostgreSQL has and Redis does not (Redis lost data: stock rebuilt
                   from it would oversell)
limit_breach       a buyer holding or owning more units of a SKU than its per-user limit
leaked             units neither available, held, sold nor in the reserve pool; a held or sold
                   counter that disagrees with the hold records; a hold still "held" past its
                   deadline plus ``expiry_grace_s`` (the sweeper had time)
stock_mismatch     PostgreSQL's stock events add up to another total or reserve than Redis has
dead_letter        stream entries the writer set aside (they need a person)
not_drained        the stream still had uncommitted entries when the wait ran out
=================  ==========================================================================

Every audit leaves its counts by kind in ``<prefix>:audit:last`` (:attr:`flashsale.keys.ServiceKeys.audit_last`), which
the service's ``/metrics`` exports so that an alert fires on any violation until a clean audit.

Differences that a live sale explains (an order paid or created after the snapshot) are
re-checked against Redis before they are reported. The snapshot reads every hold in one
command, so on a very large sale run the audit after the surge, not during it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from flashsale.keys import ServiceKeys
from flashsale.ledger import SchemaMissing, SkuStock, orders_known, read_sales
from flashsale.redis_client import as_text
from flashsale.streams import GROUP, dead_letter_key, stream_backlog
from inventory import SaleKeys, StreamId

__all__ = ["KINDS", "SCHEMA", "AuditReport", "SkuAudit", "Violation", "run_audit"]

SCHEMA = "flashsale.audit/1"
KINDS = (
    "oversold",
    "lost",
    "duplicate",
    "conflict",
    "phantom",
    "limit_breach",
    "leaked",
    "stock_mismatch",
    "dead_letter",
    "not_drained",
)
#: Violations listed in full per kind in JSON and the table (the counts are always exact).
LISTED_PER_KIND = 200

_COUNTED = ("held", "paid")  # hold states whose units are taken from stock


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    sale: str
    where: str  # "redis", "postgresql", "both" or "stream"
    detail: str
    sku: str | None = None
    order_id: str | None = None
    units: int = 0


@dataclass(frozen=True, slots=True)
class SkuAudit:
    """One SKU as Redis and PostgreSQL see it. ``pg_*`` are None when PostgreSQL has no
    stock events for the SKU."""

    sale: str
    sku: str
    total: int
    available: int
    held: int
    sold: int
    reserve: int
    limit_per_user: int
    holds_held: int  # units in Redis hold records in state held
    holds_paid: int
    pg_total: int | None
    pg_reserve: int | None
    pg_held: int  # units in PostgreSQL orders with status held
    pg_paid: int
    oversold: int
    leaked: int


@dataclass(frozen=True, slots=True)
class AuditReport:
    prefix: str
    sales: tuple[str, ...]
    started_at: float
    duration_s: float
    drained: bool
    waited_s: float
    outstanding: dict[str, int]  # sale -> stream entries not committed when the wait ended
    counts: dict[str, int]
    skus: tuple[SkuAudit, ...]
    violations: tuple[Violation, ...]

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_kind(self) -> dict[str, int]:
        counted = Counter(v.kind for v in self.violations)
        return {kind: counted.get(kind, 0) for kind in KINDS}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; ``schema`` names its version."""
        listed, dropped = _listed(self.violations)
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "started_at": _iso(self.started_at),
            "duration_s": round(self.duration_s, 3),
            "prefix": self.prefix,
            "sales": list(self.sales),
            "drain": {
                "drained": self.drained,
                "waited_s": round(self.waited_s, 3),
                "outstanding": self.outstanding,
            },
            "counts": self.counts,
            "violations_by_kind": self.by_kind(),
            "skus": [asdict(s) for s in self.skus],
            "violations": [asdict(v) for v in listed],
            "violations_not_listed": dropped,
        }

    def table(self) -> str:
        """The report for a terminal: one row per SKU, the counts by kind, then the violations."""
        out = [
            f"flashsale audit of {', '.join(self.sales) or '(no sales)'} (prefix {self.prefix}) "
            f"at {_iso(self.started_at)}, {self.duration_s:.2f} s",
            "stream drained: "
            + (
                "yes"
                if self.drained
                else f"NO after {self.waited_s:.1f} s — "
                + ", ".join(f"{s}: {n} entries outstanding" for s, n in self.outstanding.items())
            ),
            "orders: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.counts.items()),
            "",
        ]
        head = (
            "sale",
            "sku",
            "total",
            "avail",
            "held",
            "sold",
            "reserve",
            "pg total",
            "pg held",
            "pg paid",
            "oversold",
            "leaked",
        )
        rows = [head] + [
            (
                s.sale,
                s.sku,
                s.total,
                s.available,
                s.held,
                s.sold,
                s.reserve,
                "-" if s.pg_total is None else s.pg_total,
                s.pg_held,
                s.pg_paid,
                s.oversold,
                s.leaked,
            )
            for s in self.skus
        ]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
        for r in rows:
            out.append(
                "  ".join(
                    str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
                )
            )
        out.append("")
        out.append("violations: " + ", ".join(f"{k} {n}" for k, n in self.by_kind().items()))
        listed, dropped = _listed(self.violations)
        for v in listed:
            where = " ".join(x for x in (v.sale, v.sku or "", v.order_id or "") if x)
            out.append(f"  {v.kind:<14} {v.where:<10} {where}: {v.detail}")
        if dropped:
            out.append(f"  … and {dropped} more (counts above are complete)")
        if self.ok:
            out.append("AUDIT OK: nothing oversold, lost, duplicated or leaked")
        else:
            failed = ", ".join(f"{k} {n}" for k, n in self.by_kind().items() if n)
            out.append(f"AUDIT FAILED: {len(self.violations)} violations ({failed})")
        return "\n".join(out)


def _listed(violations: Iterable[Violation]) -> tuple[list[Violation], int]:
    seen: Counter[str] = Counter()
    listed: list[Violation] = []
    dropped = 0
    for v in violations:
        seen[v.kind] += 1
        if seen[v.kind] <= LISTED_PER_KIND:
            listed.append(v)
        else:
            dropped += 1
    return listed, dropped


# ------------------------------------------------------------------ reading Redis
@dataclass(slots=True)
class _Hold:
    user: str
    state: str
    request_id: str
    deadline_ms: int
    lines: dict[str, int]


@dataclass(slots=True)
class _RedisSale:
    sale: str
    stock: dict[str, dict[str, int]]
    holds: dict[str, _Hold]
    now_ms: int
    last_id: str | None  # the stream's newest entry when the snapshot was taken
    dead_key: str
    dead_letters: int
    dead_sample: list[str] = field(default_factory=list)


def _parse_hold(raw: Any) -> _Hold:
    rec = json.loads(raw)
    return _Hold(
        user=str(rec["u"]),
        state=str(rec["s"]),
        request_id=str(rec["r"]),
        deadline_ms=int(rec["d"]),
        lines={str(sku): int(qty) for sku, qty in rec["l"]},
    )


async def _read_redis(redis: Any, prefix: str, sale: str) -> _RedisSale:
    keys = SaleKeys(prefix, sale)
    dead = dead_letter_key(prefix, sale)
    on_cluster = isinstance(redis, RedisCluster)
    if on_cluster:
        # A cluster's MULTI takes keyed commands only (TIME has no key), so ask the clock of
        # the shard serving the sale (the one its scripts set deadlines by) just before the
        # snapshot: an earlier "now" can only find fewer holds overdue, never a wrong one.
        await redis.initialize()  # the slot map (a no-op once the client has it)
        now = await redis.time(target_nodes=redis.get_node_from_key(keys.stock))
    async with redis.pipeline(transaction=True) as pipe:  # one consistent snapshot (one slot)
        pipe.hgetall(keys.stock)
        pipe.hgetall(keys.holds)
        if not on_cluster:
            pipe.time()
        pipe.xrevrange(keys.events, "+", "-", count=1)
        pipe.xlen(dead)
        if on_cluster:
            stock_raw, holds_raw, last, dead_len = await pipe.execute()
        else:
            stock_raw, holds_raw, now, last, dead_len = await pipe.execute()
    stock: dict[str, dict[str, int]] = defaultdict(dict)
    for name, value in stock_raw.items():
        sku, _, counter = as_text(name).rpartition(":")
        stock[sku][counter] = int(value)
    holds = {as_text(h): _parse_hold(raw) for h, raw in holds_raw.items()}
    sample = []
    if dead_len:
        for _, f in await redis.xrange(dead, count=3):
            fields = {as_text(k): as_text(v) for k, v in f.items()}
            sample.append(
                f"{fields.get('order') or fields.get('sku') or '?'}: {fields.get('dead_error', '?')}"
            )
    return _RedisSale(
        sale=sale,
        stock=dict(stock),
        holds=holds,
        now_ms=int(now[0]) * 1000 + int(now[1]) // 1000,
        last_id=as_text(last[0][0]) if last else None,
        dead_key=dead,
        dead_letters=int(dead_len),
        dead_sample=sample,
    )


async def _outstanding(redis: Any, key: str, up_to: str | None) -> bool:
    """True while some entry at or below ``up_to`` is not committed by the writers."""
    if up_to is None:
        return False
    try:
        groups = await redis.xinfo_groups(key)
    except ResponseError:  # the stream is gone
        return False
    ours = next((g for g in groups if as_text(g["name"]) == GROUP), None)
    if ours is None:  # no writer ever read this stream
        return bool(await redis.xlen(key))
    last_delivered = as_text(ours["last-delivered-id"])
    if StreamId.parse(last_delivered) < StreamId.parse(up_to) and await redis.xrange(
        key, "(" + last_delivered, up_to, count=1
    ):
        return True
    return bool(await redis.xpending_range(key, GROUP, "-", up_to, 1))


async def _wait_drained(
    redis: Any, prefix: str, snapshots: dict[str, _RedisSale], wait_s: float
) -> tuple[bool, float, dict[str, int]]:
    started = time.monotonic()
    while True:
        left = [
            sale
            for sale, snap in snapshots.items()
            if await _outstanding(redis, SaleKeys(prefix, sale).events, snap.last_id)
        ]
        waited = time.monotonic() - started
        if not left:
            return True, waited, {}
        if waited >= wait_s:
            # How far behind: counted exactly up to 100,000 undelivered entries per stream.
            backlog = {
                sale: (await stream_backlog(redis, SaleKeys(prefix, sale).events, count_up_to=100_000)).total
                for sale in left
            }
            return False, waited, backlog
        await asyncio.sleep(min(0.1, max(wait_s - waited, 0)))


# ------------------------------------------------------------- reading PostgreSQL
@dataclass(slots=True)
class _PgOrder:
    sale: str
    user: str
    request_id: str
    status: str
    lines: dict[str, int] = field(default_factory=dict)


async def _read_postgres(
    pool: Any, sales: list[str]
) -> tuple[dict[str, _PgOrder], dict[tuple[str, str], SkuStock]]:
    try:
        records = await read_sales(pool, sales)  # one snapshot
    except SchemaMissing as exc:
        raise RuntimeError(str(exc)) from None
    orders = {
        r["order_id"]: _PgOrder(r["sale"], r["user_id"], r["request_id"], r["status"]) for r in records.orders
    }
    for order_id, lines in records.lines.items():
        orders[order_id].lines.update(lines)
    return orders, records.stock()


async def _current_holds(redis: Any, prefix: str, order_ids: Iterable[str]) -> dict[str, _Hold | None]:
    """Holds as Redis has them now (for re-checking what a live sale may explain)."""
    by_sale: dict[str, list[str]] = defaultdict(list)
    for order_id in order_ids:
        by_sale[order_id.partition(".")[0]].append(order_id)
    found: dict[str, _Hold | None] = {}
    for sale, ids in by_sale.items():
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            raws = await redis.hmget(SaleKeys(prefix, sale).holds, chunk)
            found.update({h: None if raw is None else _parse_hold(raw) for h, raw in zip(chunk, raws)})
    return found


# -------------------------------------------------------------------- comparing
def _units(holds: Iterable[_Hold | _PgOrder], state: str, attr: str = "state") -> Counter[str]:
    units: Counter[str] = Counter()
    for h in holds:
        if getattr(h, attr) == state:
            units.update(h.lines)
    return units


def _per_user(holds: Iterable[_Hold | _PgOrder], attr: str) -> Counter[tuple[str, str]]:
    owned: Counter[tuple[str, str]] = Counter()
    for h in holds:
        if getattr(h, attr) in _COUNTED:
            for sku, qty in h.lines.items():
                owned[(h.user, sku)] += qty
    return owned


def _compare_sale(
    snap: _RedisSale,
    pg_orders: dict[str, _PgOrder],
    pg_stock: dict[tuple[str, str], SkuStock],
    grace_ms: int,
) -> tuple[list[SkuAudit], list[Violation]]:
    sale = snap.sale
    out: list[Violation] = []
    mine = {o: p for o, p in pg_orders.items() if p.sale == sale}
    r_held, r_paid = _units(snap.holds.values(), "held"), _units(snap.holds.values(), "paid")
    p_held, p_paid = _units(mine.values(), "held", "status"), _units(mine.values(), "paid", "status")
    limits: dict[str, int] = {}
    skus: list[SkuAudit] = []
    for sku in sorted(set(snap.stock) | {k for s, k in pg_stock if s == sale}):
        c = snap.stock.get(sku, {})
        total, avail, held, sold, reserve = (
            c.get(k, 0) for k in ("total", "available", "held", "sold", "reserve")
        )
        pg = pg_stock.get((sale, sku))
        pg_total = pg.total if pg and pg.stocked else None
        limits[sku] = c.get("limit") or (pg.limit if pg else 0)

        pg_basis = pg_total if pg_total is not None else total
        over = {
            ("redis", "sold + held counters", total): sold + held - total,
            ("redis", "units in paid and held holds", total): r_held[sku] + r_paid[sku] - total,
            ("postgresql", "units in paid and held orders", pg_basis): p_held[sku] + p_paid[sku] - pg_basis,
        }
        oversold = max(0, *over.values())
        for (where, what, basis), units in over.items():
            if units > 0:
                out.append(
                    Violation(
                        "oversold",
                        sale,
                        where,
                        f"{what} exceed the {basis} units stocked by {units}",
                        sku=sku,
                        units=units,
                    )
                )

        unaccounted = total - avail - held - sold - reserve
        leaked = abs(unaccounted)
        if unaccounted or min(avail, held, sold, reserve) < 0:
            out.append(
                Violation(
                    "leaked",
                    sale,
                    "redis",
                    f"total {total} != available {avail} + held {held} + sold {sold} + reserve {reserve} ({unaccounted:+d} units unaccounted)",
                    sku=sku,
                    units=leaked,
                )
            )
        if held != r_held[sku]:
            out.append(
                Violation(
                    "leaked",
                    sale,
                    "redis",
                    f"held counter {held} != {r_held[sku]} units in holds still held",
                    sku=sku,
                    units=abs(held - r_held[sku]),
                )
            )
            leaked = max(leaked, abs(held - r_held[sku]))
        if sold != r_paid[sku]:
            out.append(
                Violation(
                    "leaked",
                    sale,
                    "redis",
                    f"sold counter {sold} != {r_paid[sku]} units in paid holds",
                    sku=sku,
                    units=abs(sold - r_paid[sku]),
                )
            )
            leaked = max(leaked, abs(sold - r_paid[sku]))
        if pg is not None and pg.stocked and c:
            if pg.total != total or pg.reserve != reserve:
                out.append(
                    Violation(
                        "stock_mismatch",
                        sale,
                        "both",
                        f"PostgreSQL's stock events give total {pg.total}, reserve {pg.reserve}; Redis has total {total}, reserve {reserve}",
                        sku=sku,
                    )
                )
        elif c and not (pg and pg.stocked):
            out.append(
                Violation(
                    "stock_mismatch",
                    sale,
                    "postgresql",
                    "PostgreSQL has no 'stocked' event for this SKU",
                    sku=sku,
                )
            )
        elif pg and pg.stocked and not c:
            out.append(
                Violation(
                    "stock_mismatch",
                    sale,
                    "redis",
                    "Redis has no counters for a SKU PostgreSQL has stock events for",
                    sku=sku,
                )
            )
        skus.append(
            SkuAudit(
                sale,
                sku,
                total,
                avail,
                held,
                sold,
                reserve,
                limits[sku],
                r_held[sku],
                r_paid[sku],
                pg_total,
                pg.reserve if pg and pg.stocked else None,
                p_held[sku],
                p_paid[sku],
                oversold,
                leaked,
            )
        )

    for where, attr, population in (
        ("redis", "state", snap.holds.values()),
        ("postgresql", "status", mine.values()),
    ):
        for (user, sku), owned in sorted(_per_user(population, attr).items()):
            limit = limits.get(sku, 0)
            if limit and owned > limit:
                out.append(
                    Violation(
                        "limit_breach",
                        sale,
                        where,
                        f"buyer {user} holds or owns {owned} units, limit {limit}",
                        sku=sku,
                        units=owned - limit,
                    )
                )

    for hold_id, h in snap.holds.items():
        if h.state == "held" and h.deadline_ms + grace_ms < snap.now_ms:
            late = (snap.now_ms - h.deadline_ms) / 1000
            out.append(
                Violation(
                    "leaked",
                    sale,
                    "redis",
                    f"still held {late:.1f} s after its payment deadline ({sum(h.lines.values())} units stranded)",
                    order_id=hold_id,
                    units=sum(h.lines.values()),
                )
            )

    for where, pairs in (
        # Request ids are each buyer's own: two buyers' orders under one id are no duplicate.
        ("postgresql", [((p.user, p.request_id), o) for o, p in mine.items()]),
        ("redis", [((h.user, h.request_id), o) for o, h in snap.holds.items()]),
    ):
        by_request: dict[tuple[str, str], list[str]] = defaultdict(list)
        for buyer_request, order_id in pairs:
            by_request[buyer_request].append(order_id)
        for (user, request_id), ids in sorted(by_request.items()):
            if len(ids) > 1:
                out.append(
                    Violation(
                        "duplicate",
                        sale,
                        where,
                        f"request {request_id} of buyer {user} has {len(ids)} orders: {', '.join(sorted(ids))}",
                        order_id=sorted(ids)[1],
                        units=len(ids) - 1,
                    )
                )

    if snap.dead_letters:
        out.append(
            Violation(
                "dead_letter",
                sale,
                "stream",
                f"{snap.dead_letters} entries in {snap.dead_key} (e.g. "
                + "; ".join(snap.dead_sample)
                + "): move them back to the events stream once fixed, or settle them by hand",
                units=snap.dead_letters,
            )
        )
    return skus, out


def _order_differences(h: _Hold, p: _PgOrder) -> list[str]:
    diffs = []
    if h.state != p.status:
        diffs.append(f"status {h.state} in Redis, {p.status} in PostgreSQL")
    if h.user != p.user:
        diffs.append(f"buyer {h.user} in Redis, {p.user} in PostgreSQL")
    if h.request_id != p.request_id:
        diffs.append(f"request {h.request_id} in Redis, {p.request_id} in PostgreSQL")
    if h.lines != p.lines:
        diffs.append(f"lines {h.lines} in Redis, {p.lines} in PostgreSQL")
    return diffs


async def _stranded_transfers(
    redis: Any, prefix: str, sales: list[str], grace_s: float = 15.0
) -> list[Violation]:
    """Units between two buckets of a bucketed sale for longer than a transfer takes: a
    process died mid-pull and nothing has settled it yet (the worker's sweeper does)."""
    out = []
    for sale in sales:
        for transfer, raw in (await redis.hgetall(SaleKeys(prefix, sale).transfers)).items():
            intent = json.loads(raw)
            age = time.time() - float(intent["at"])
            if age >= grace_s:
                out.append(
                    Violation(
                        "leaked",
                        sale,
                        "redis",
                        f"transfer {as_text(transfer)} of {intent['units']} unit(s) from {intent['from']} unsettled for {age:.0f} s: "
                        "is `flashsale worker` (its sweeper settles transfers) running?",
                        sku=intent["sku"],
                        units=int(intent["units"]),
                    )
                )
    return out


# ------------------------------------------------------------------------- entry
async def run_audit(
    redis: Any,
    pool: Any,
    *,
    prefix: str = "fs",
    sales: Iterable[str] | None = None,
    acknowledged: Iterable[str] | None = None,
    wait_drain_s: float = 30.0,
    expiry_grace_s: float = 5.0,
) -> AuditReport:
    """Audit ``sales`` (default: every sale in ``<prefix>:sales``); see the module docstring.

    ``redis`` is a ``redis.asyncio.Redis`` or ``RedisCluster`` (bytes or decoded replies),
    ``pool`` an asyncpg pool. ``acknowledged`` lists order ids clients were told exist (2xx);
    each must be in Redis and PostgreSQL. ``expiry_grace_s``: how long past its deadline a
    hold may still be held before it counts as stranded (the sweeper's allowance).
    """
    started, clock = time.time(), time.monotonic()
    if sales is None:
        sale_list = sorted(as_text(s) for s in await redis.smembers(ServiceKeys(prefix).sales))
    else:
        sale_list = sorted(set(sales))
    snapshots = {sale: await _read_redis(redis, prefix, sale) for sale in sale_list}
    drained, waited, outstanding = await _wait_drained(redis, prefix, snapshots, wait_drain_s)
    pg_orders, pg_stock = await _read_postgres(pool, sale_list)

    skus: list[SkuAudit] = []
    violations: list[Violation] = []
    if not drained:
        for sale, n in outstanding.items():
            violations.append(
                Violation(
                    "not_drained",
                    sale,
                    "stream",
                    f"{n} entries not committed after waiting {waited:.1f} s: is `flashsale worker` running? Lost/conflict results below may be stale",
                    units=n,
                )
            )
    for snap in snapshots.values():
        sale_skus, sale_violations = _compare_sale(snap, pg_orders, pg_stock, int(expiry_grace_s * 1000))
        skus += sale_skus
        violations += sale_violations
    violations += await _stranded_transfers(redis, prefix, sale_list)

    # Orders: every hold Redis knows must be in PostgreSQL with the same story.
    all_holds = {o: h for snap in snapshots.values() for o, h in snap.holds.items()}
    suspects: set[str] = set()  # orders that looked wrong, re-checked below
    for order_id, h in all_holds.items():
        p = pg_orders.get(order_id)
        if p is None:
            violations.append(
                Violation(
                    "lost",
                    order_id.partition(".")[0],
                    "postgresql",
                    f"Redis has this {h.state} order, PostgreSQL does not",
                    order_id=order_id,
                    units=sum(h.lines.values()),
                )
            )
        elif _order_differences(h, p):
            suspects.add(order_id)
    suspects |= pg_orders.keys() - all_holds.keys()
    # A live sale moves on after the snapshot: keep only what Redis still contradicts.
    now_holds = await _current_holds(redis, prefix, suspects)
    for order_id in sorted(suspects):
        p, now = pg_orders[order_id], now_holds.get(order_id)
        if now is None:
            violations.append(
                Violation(
                    "phantom",
                    p.sale,
                    "redis",
                    f"PostgreSQL has this {p.status} order, Redis does not",
                    order_id=order_id,
                    units=sum(p.lines.values()),
                )
            )
        elif diffs := _order_differences(now, p):
            violations.append(Violation("conflict", p.sale, "both", "; ".join(diffs), order_id=order_id))

    ack = sorted(set(acknowledged or ()))
    if ack:
        in_pg = {o for o in ack if o in pg_orders} | await orders_known(
            pool, [o for o in ack if o not in pg_orders]
        )
        in_redis = {o for o in ack if o in all_holds}
        in_redis |= {
            o
            for o, h in (await _current_holds(redis, prefix, [o for o in ack if o not in in_redis])).items()
            if h
        }
        for order_id in ack:
            sale = order_id.partition(".")[0]
            if order_id not in in_pg:
                violations.append(
                    Violation(
                        "lost",
                        sale,
                        "postgresql",
                        "acknowledged to the client, missing in PostgreSQL",
                        order_id=order_id,
                    )
                )
            if order_id not in in_redis:
                violations.append(
                    Violation(
                        "lost",
                        sale,
                        "redis",
                        "acknowledged to the client, missing in Redis",
                        order_id=order_id,
                    )
                )

    counts = {
        "holds_in_redis": len(all_holds),
        "orders_in_postgresql": len(pg_orders),
        "acknowledged": len(ack),
        "dead_letters": sum(s.dead_letters for s in snapshots.values()),
    }
    order = {k: i for i, k in enumerate(KINDS)}
    violations.sort(key=lambda v: (order[v.kind], v.sale, v.sku or "", v.order_id or ""))
    report = AuditReport(
        prefix=prefix,
        sales=tuple(sale_list),
        started_at=started,
        duration_s=time.monotonic() - clock,
        drained=drained,
        waited_s=waited,
        outstanding=outstanding,
        counts=counts,
        skus=tuple(skus),
        violations=tuple(violations),
    )
    await redis.hset(
        ServiceKeys(prefix).audit_last, mapping={"at_ms": int(started * 1000), **report.by_kind()}
    )
    return report
