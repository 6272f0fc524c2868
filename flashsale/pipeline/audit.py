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

A sale id used again (a yearly ``d11``) has the rows of each of its creations in
PostgreSQL: every row belongs to a generation (:func:`flashsale.ledger.generation_of`;
the generations recorded in ``fence_sales`` and the one Redis holds). Redis is compared
with the rows of the generation it holds; each earlier generation is audited on its own
rows (oversold, duplicate, limit_breach), so one creation's stock never hides another's
oversell. A violation names its ``generation``.

Differences that a live sale explains (an order paid or created after the snapshot) are
re-checked against Redis before they are reported. The snapshot reads every hold in one
command, so on a very large sale run the audit after the surge, not during it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from flashsale.fence.verify import generations_recorded
from flashsale.keys import ServiceKeys
from flashsale.ledger import (
    SchemaMissing,
    SkuStock,
    fold_stock,
    generation_of,
    made_at_ms,
    orders_known,
    read_sales,
)
from flashsale.redis_client import as_text
from flashsale.streams import GROUP, dead_letter_key, stream_backlog
from inventory import SaleKeys, StreamId, parent_sale_id

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
    #: The creation of the sale id the violation is about (ms of the Redis clock; 0: from
    #: before generations); None for what is not about one (the stream, transfers, Redis).
    generation: int | None = None


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


def _dead_subject(fields: dict[str, str]) -> str:
    """What a dead letter was about: its order or SKU, or a reservation call's holds (its
    fields but ``type``, ``at`` and the writer's ``dead_*``)."""
    if fields.get("type") == "reserved_batch":
        holds = [k for k in fields if k not in ("type", "at") and not k.startswith("dead_")]
        return f"{holds[0]} and {len(holds) - 1} more holds" if holds else "?"
    return fields.get("order") or fields.get("sku") or "?"


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
            sample.append(f"{_dead_subject(fields)}: {fields.get('dead_error', '?')}")
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
    generation: int = 0
    lines: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _TransferLegs:
    """One bucket transfer as PostgreSQL recorded it: (engine sale, sku, units) per side."""

    out: list[tuple[str, str, int]] = field(default_factory=list)  # the donor's write-off
    into: list[tuple[str, str, int]] = field(default_factory=list)  # the receiver's add

    @property
    def gap(self) -> int:
        """Units written off minus units received (> 0: still on their way, or lost)."""
        return sum(u for _, _, u in self.out) - sum(u for _, _, u in self.into)


#: Stock events, each with the generation it belongs to, in stream order per SKU.
_Events = list[tuple[int, Mapping[str, Any]]]


async def _read_postgres(
    pool: Any, sales: list[str], generations: dict[str, list[int]]
) -> tuple[dict[str, _PgOrder], _Events, dict[str, _TransferLegs]]:
    """Orders, stock events and transfers of ``sales``, every order and stock event placed
    in its generation (``generations``: engine sale -> the generations known of its sale)."""
    try:
        records = await read_sales(pool, sales)  # one snapshot
    except SchemaMissing as exc:
        raise RuntimeError(str(exc)) from None
    orders = {
        r["order_id"]: _PgOrder(
            r["sale"],
            r["user_id"],
            r["request_id"],
            r["status"],
            generation_of(made_at_ms(r), generations.get(r["sale"], ())),
        )
        for r in records.orders
    }
    for order_id, lines in records.lines.items():
        orders[order_id].lines.update(lines)
    events: _Events = []
    transfers: dict[str, _TransferLegs] = defaultdict(_TransferLegs)
    for e in records.events:
        events.append((generation_of(e["stream_ms"], generations.get(e["sale"], ())), e))
        if e["transfer"] is not None:
            leg = transfers[e["transfer"]]
            (leg.out if e["delta"] < 0 else leg.into).append((e["sale"], e["sku"], abs(e["delta"])))
    return orders, events, dict(transfers)


async def _generations(
    redis: Any, pool: Any, prefix: str, sales: list[str]
) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(engine sale -> the generation Redis holds, engine sale -> every generation known of
    its sale). Without a settings hash, Redis is taken to hold the one recorded last."""
    parents = {sale: (parent_sale_id(sale) or (sale, 0))[0] for sale in sales}
    recorded = await generations_recorded(pool, prefix, parents.values())
    held: dict[str, int] = {}
    for parent in sorted(set(parents.values())):
        gen, opens = await redis.hmget(ServiceKeys(prefix).sale(parent), ["generation", "opens_at_ms"])
        if gen is None and opens is None:
            held[parent] = max(recorded.get(parent, [0]))
        else:
            held[parent] = int(gen or 0)
    return (
        {sale: held[parent] for sale, parent in parents.items()},
        {sale: sorted({0, held[parent], *recorded.get(parent, [])}) for sale, parent in parents.items()},
    )


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


def _limit_breaches(
    sale: str, where: str, owned: Counter[tuple[str, str]], limits: dict[str, int]
) -> list[Violation]:
    out = []
    for (user, sku), units in sorted(owned.items()):
        limit = limits.get(sku, 0)
        if limit and units > limit:
            out.append(
                Violation(
                    "limit_breach",
                    sale,
                    where,
                    f"buyer {user} holds or owns {units} units, limit {limit}",
                    sku=sku,
                    units=units - limit,
                )
            )
    return out


def _duplicates(sale: str, where: str, pairs: Iterable[tuple[tuple[str, str], str]]) -> list[Violation]:
    """Two orders for one request of one buyer (``pairs``: (buyer, request id), order id).
    Request ids are each buyer's own: two buyers' orders under one id are no duplicate."""
    by_request: dict[tuple[str, str], list[str]] = defaultdict(list)
    for buyer_request, order_id in pairs:
        by_request[buyer_request].append(order_id)
    return [
        Violation(
            "duplicate",
            sale,
            where,
            f"request {request_id} of buyer {user} has {len(ids)} orders: {', '.join(sorted(ids))}",
            order_id=sorted(ids)[1],
            units=len(ids) - 1,
        )
        for (user, request_id), ids in sorted(by_request.items())
        if len(ids) > 1
    ]


def _earlier_generation(
    sale: str, generation: int, orders: dict[str, _PgOrder], stock: dict[str, SkuStock]
) -> list[Violation]:
    """An earlier creation of the sale id, on PostgreSQL's rows alone (Redis holds a later
    one): its own orders against its own stock."""
    label = f"generation {generation} (an earlier creation of {sale})"
    held, paid = _units(orders.values(), "held", "status"), _units(orders.values(), "paid", "status")
    out = [
        Violation(
            "oversold",
            sale,
            "postgresql",
            f"units in paid and held orders exceed the {s.total} units stocked by {over}",
            sku=sku,
            units=over,
        )
        for sku, s in sorted(stock.items())
        if (over := held[sku] + paid[sku] - s.total) > 0
    ]
    out += _limit_breaches(
        sale, "postgresql", _per_user(orders.values(), "status"), {k: s.limit for k, s in stock.items()}
    )
    out += _duplicates(sale, "postgresql", [((p.user, p.request_id), o) for o, p in orders.items()])
    return [replace(v, generation=generation, detail=f"{label}: {v.detail}") for v in out]


def _compare_sale(
    snap: _RedisSale,
    pg_orders: dict[str, _PgOrder],
    pg_stock: dict[tuple[str, str], SkuStock],
    grace_ms: int,
    generation: int,
) -> tuple[list[SkuAudit], list[Violation]]:
    """The sale as Redis holds it (its ``generation``) against PostgreSQL's rows of it."""
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

    out += _limit_breaches(sale, "redis", _per_user(snap.holds.values(), "state"), limits)
    out += _limit_breaches(sale, "postgresql", _per_user(mine.values(), "status"), limits)

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

    out += _duplicates(sale, "postgresql", [((p.user, p.request_id), o) for o, p in mine.items()])
    out += _duplicates(sale, "redis", [((h.user, h.request_id), o) for o, h in snap.holds.items()])

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
    return skus, [v if v.kind == "dead_letter" else replace(v, generation=generation) for v in out]


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


async def _intents(redis: Any, prefix: str, sales: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Transfer id -> (receiving sale, intent) of every transfer still in progress."""
    found = {}
    for sale in sales:
        for transfer, raw in (await redis.hgetall(SaleKeys(prefix, sale).transfers)).items():
            found[as_text(transfer)] = (sale, json.loads(raw))
    return found


def _stranded_transfers(
    intents: dict[str, tuple[str, dict[str, Any]]], snapshots: dict[str, _RedisSale], grace_s: float = 15.0
) -> list[Violation]:
    """Units between two buckets of a bucketed sale for longer than a transfer takes: a
    process died mid-pull and nothing has settled it yet (the worker's sweeper does). An
    intent's age is read on the clock that stamped it: the receiving bucket's Redis. One
    left by a version before transfer ids carries its service process's seconds instead; it
    is aged on that same Redis clock too, never on the audit's (a laptop's clock running
    ahead made a transfer in flight look leaked)."""
    out = []
    for transfer, (sale, intent) in intents.items():
        now_ms = snapshots[sale].now_ms
        stamped_ms = int(intent["at_ms"]) if "at_ms" in intent else round(float(intent["at"]) * 1000)
        age = (now_ms - stamped_ms) / 1000
        if age >= grace_s:
            out.append(
                Violation(
                    "leaked",
                    sale,
                    "redis",
                    f"transfer {transfer} of {intent['units']} unit(s) from {intent['from']} unsettled for {age:.0f} s: "
                    "is `flashsale worker` (its sweeper settles transfers) running?",
                    sku=intent["sku"],
                    units=int(intent["units"]),
                )
            )
    return out


async def _unreceived_transfers(
    redis: Any,
    prefix: str,
    sales: list[str],
    legs: dict[str, _TransferLegs],
    intents: dict[str, tuple[str, dict[str, Any]]],
) -> list[Violation]:
    """Transfers whose two stock events in PostgreSQL do not add up and that no intent in
    Redis explains: units written off that no bucket received are lost in transit (a
    transfer's intent dropped without its units, e.g. after Redis lost the donor's record),
    units received that no bucket wrote off were made from nothing. A live sale may have
    finished a transfer after PostgreSQL was read: the other side's operation record in
    Redis is asked before anything is reported."""
    out = []
    for transfer, leg in sorted(legs.items()):
        if leg.gap == 0 or transfer in intents:
            continue  # balanced, or still in progress (judged by _stranded_transfers)
        side, want = ("xi", leg.out) if leg.gap > 0 else ("xo", leg.into)
        records = [
            await redis.hget(SaleKeys(prefix, sale).requests, f"op:{side}-{transfer}") for sale in sales
        ]
        if any(r is not None and as_text(r) != "aborted" for r in records):
            continue  # the other side happened; its entry was not in PostgreSQL yet
        sale, sku, _ = want[0]
        units = abs(leg.gap)
        detail = (
            f"transfer {transfer}: {units} unit(s) written off here that no bucket received, and no "
            "intent is left to finish it: lost in transit"
            if leg.gap > 0
            else f"transfer {transfer}: {units} unit(s) received here that no bucket wrote off"
        )
        out.append(
            Violation(
                "leaked" if leg.gap > 0 else "stock_mismatch", sale, "both", detail, sku=sku, units=units
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
    held, known = await _generations(redis, pool, prefix, sale_list)
    every_order, events, pg_transfers = await _read_postgres(pool, sale_list, known)
    # Redis is compared with the generation it holds (and any later one PostgreSQL has:
    # Redis went back); each earlier one is audited on its own below.
    pg_orders = {o: p for o, p in every_order.items() if p.generation >= held[p.sale]}
    pg_stock = fold_stock(e for gen, e in events if gen >= held[e["sale"]])

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
        sale_skus, sale_violations = _compare_sale(
            snap, pg_orders, pg_stock, int(expiry_grace_s * 1000), held[snap.sale]
        )
        skus += sale_skus
        violations += sale_violations
    earlier = {(p.sale, p.generation) for p in every_order.values()} | {(e["sale"], g) for g, e in events}
    for sale, gen in sorted(earlier):
        if gen < held[sale]:
            orders = {o: p for o, p in every_order.items() if (p.sale, p.generation) == (sale, gen)}
            stock = fold_stock(e for g, e in events if (e["sale"], g) == (sale, gen))
            violations += _earlier_generation(sale, gen, orders, {sku: st for (_, sku), st in stock.items()})
    intents = await _intents(redis, prefix, sale_list)
    violations += _stranded_transfers(intents, snapshots)
    violations += await _unreceived_transfers(redis, prefix, sale_list, pg_transfers, intents)

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
