"""The drill's checker: a Jepsen-style history of every client request, and the checks run
on it against what PostgreSQL and Redis hold once the drill is over.

Every request a drill client sends is one :class:`Operation` with an outcome:

* **ok** — a 2xx answer: the service acknowledged it (the order exists, the payment
  happened);
* **failed** — a definite refusal: a 4xx (among them 429 ``overloaded``, the in-flight
  limit), or a 503 the service answers before touching stock (``sale_fenced``,
  ``degraded``); nothing was done;
* **unknown** — anything else: 504 ``outcome_unknown``, another 5xx, a timeout, a reset
  connection. It may or may not have happened; a retry with the same request id tells.

A buyer's request id is *acknowledged* if any attempt was ok, *definitely failed* if every
attempt failed, and *unknown* otherwise. :func:`check` then asserts:

==================  =====================================================================
check               holds when
==================  =====================================================================
acknowledged        every acknowledged order is in PostgreSQL
exactly_once        no buyer's request id has two orders (in PostgreSQL, or among the
                    answers); request ids are each buyer's own
not_failed          no order of a definitely-failed request id is in PostgreSQL
acknowledged_state  a payment or cancellation the client was told of is PostgreSQL's status
no_oversell         per SKU, units held + paid ≤ units stocked − the reserve pool, in
                    PostgreSQL and in Redis
conservation        per SKU in Redis: available + held + sold + reserve = total, none < 0,
                    and total = what PostgreSQL's stock events add up to
no_leak             once holds lapsed: nothing held in Redis, no order still "held" in
                    PostgreSQL, sold = paid units, available = total − reserve − sold
audit               the project audit (:func:`flashsale.pipeline.audit.run_audit`) found nothing
no_internal_error   no answer was 500: a fault is answered 503/504 with its reason, and an
                    unhandled error is a bug to find in the service log, whatever it did
==================  =====================================================================

Unknown outcomes may land either way; they are counted, never blamed.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from flashsale.ledger import read_sales
from flashsale.redis_client import as_text
from inventory import SaleKeys

__all__ = [
    "CHECKS",
    "CheckReport",
    "History",
    "Observed",
    "Operation",
    "Outcome",
    "check",
    "classify",
    "observe",
]

Outcome = Literal["ok", "failed", "unknown"]

CHECKS = (
    "acknowledged",
    "exactly_once",
    "not_failed",
    "acknowledged_state",
    "no_oversell",
    "conservation",
    "no_leak",
    "audit",
    "no_internal_error",
)
#: 503 answers given before stock is touched: the request definitely did nothing.
DEFINITE_503 = frozenset({"sale_fenced", "degraded", "rate_limited"})
#: Violations listed per check (the count is always exact).
LISTED = 20


def classify(status: int, code: str | None = None) -> Outcome:
    """The outcome of one answer (status 0 = none: timeout, reset, refused)."""
    if 200 <= status < 300:
        return "ok"
    if 400 <= status < 500:
        return "failed"
    if status == 503 and code in DEFINITE_503:
        return "failed"
    return "unknown"


@dataclass(frozen=True, slots=True)
class Operation:
    """One request of the history."""

    kind: Literal["order", "pay", "cancel"]
    key: str  # order: the request id; pay / cancel: the order id
    user: str
    attempt: int  # 0 = first try, n = n-th retry (sent as X-Retry-Attempt)
    started: float  # seconds since the drill began
    ended: float
    status: int  # HTTP status; 0 = no answer
    outcome: Outcome
    code: str = ""  # the error code, or the exception's name when there was no answer
    order_id: str | None = None  # ok orders
    state: str | None = None  # ok: the order's status as answered (held, paid, cancelled, expired)
    lines: tuple[tuple[str, int], ...] = ()
    replayed: bool = False


class History:
    """The drill's operations, in the order they completed."""

    def __init__(self, ops: Iterable[Operation] = ()) -> None:
        self.ops: list[Operation] = list(ops)

    def add(self, op: Operation) -> None:
        self.ops.append(op)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def counts(self) -> dict[str, int]:
        c = Counter(op.outcome for op in self.ops)
        return {k: c.get(k, 0) for k in ("ok", "failed", "unknown")}

    def orders(self) -> dict[tuple[str, str], list[Operation]]:
        """(buyer, request id) -> its attempts, in order (request ids are each buyer's own)."""
        out: dict[tuple[str, str], list[Operation]] = defaultdict(list)
        for op in self.ops:
            if op.kind == "order":
                out[(op.user, op.key)].append(op)
        return out

    def save(self, path: Path) -> None:
        with path.open("w") as f:
            for op in self.ops:
                f.write(json.dumps(asdict(op), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> History:
        ops = []
        for line in path.read_text().splitlines():
            raw = json.loads(line)
            raw["lines"] = tuple(tuple(x) for x in raw.get("lines", ()))
            ops.append(Operation(**raw))
        return cls(ops)


# ------------------------------------------------------------------ observation
@dataclass(slots=True)
class _Order:
    sale: str
    request_id: str
    user: str
    status: str
    pay_by_ms: int
    lines: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Observed:
    """PostgreSQL and Redis after the drill, for the sales checked."""

    now_ms: int
    orders: dict[str, _Order]  # order id -> order, from PostgreSQL
    pg_stock: dict[tuple[str, str], tuple[int, int]]  # (engine sale, sku) -> (total, reserve)
    redis_stock: dict[tuple[str, str], dict[str, int]]  # (engine sale, sku) -> counters
    audit: Any = None  # flashsale.pipeline.audit.AuditReport, when it was run


async def observe(redis: Any, pool: Any, *, prefix: str, sale: str, audit: Any = None) -> Observed:
    """Read PostgreSQL's orders and stock events of ``sale`` (and its buckets ``<sale>-b<k>``)
    and Redis's counters. Run it after the writer drained (``run_audit`` waits for that)."""
    records = await read_sales(pool, [sale], with_buckets=True)
    orders = {
        r["order_id"]: _Order(
            r["sale"], r["request_id"], r["user_id"], r["status"], int(r["pay_by"].timestamp() * 1000)
        )
        for r in records.orders
    }
    for order_id, lines in records.lines.items():
        orders[order_id].lines.update(lines)
    stock = {key: [s.total, s.reserve] for key, s in records.stock().items()}
    engines = sorted({engine for engine, _ in stock})
    redis_stock: dict[tuple[str, str], dict[str, int]] = {}
    for engine in engines:
        for name, value in (await redis.hgetall(SaleKeys(prefix, engine).stock)).items():
            sku, _, counter = as_text(name).rpartition(":")
            redis_stock.setdefault((engine, sku), {})[counter] = int(value)
    now = await redis.time()
    return Observed(
        int(now[0]) * 1000 + int(now[1]) // 1000,
        orders,
        {k: (v[0], v[1]) for k, v in stock.items()},
        redis_stock,
        audit,
    )


# ------------------------------------------------------------------------ checks
@dataclass(frozen=True, slots=True)
class CheckReport:
    violations: dict[str, list[str]]  # check -> what is wrong (all of CHECKS present)
    requests: dict[str, int]  # ok / failed / unknown
    order_ids: dict[str, int]  # acknowledged / failed / unknown request ids
    unknown_resolved: int  # unknown attempts whose request id a later attempt settled
    replayed: int  # ok answers that were replays of an earlier attempt
    checked_at: float

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def failed_checks(self) -> list[str]:
        return [name for name in CHECKS if self.violations.get(name)]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            **asdict(self),
            "violations": {k: v[:LISTED] for k, v in self.violations.items()},
            "violation_counts": {k: len(v) for k, v in self.violations.items()},
        }

    def table(self) -> str:
        out = [
            f"requests: ok {self.requests['ok']}, failed {self.requests['failed']}, unknown {self.requests['unknown']}; "
            f"request ids: acknowledged {self.order_ids['acknowledged']}, failed {self.order_ids['failed']}, "
            f"unknown {self.order_ids['unknown']}; unknown attempts settled by a retry {self.unknown_resolved}; "
            f"replays {self.replayed}"
        ]
        for name in CHECKS:
            found = self.violations.get(name, [])
            out.append(f"  {'ok  ' if not found else 'FAIL'} {name}" + (f": {len(found)}" if found else ""))
            out += [f"         {v}" for v in found[:LISTED]]
        return "\n".join(out)


def _sale_of(engine: str) -> str:
    from inventory import parent_sale_id

    parsed = parent_sale_id(engine)
    return parsed[0] if parsed else engine


def check(history: History, seen: Observed, *, lapsed: bool = True, grace_ms: int = 5000) -> CheckReport:
    """Run every check of the module docstring. ``lapsed``: every hold's deadline has passed
    (the drill waited), so the ``no_leak`` check applies."""
    v: dict[str, list[str]] = {name: [] for name in CHECKS}
    by_request = history.orders()
    acknowledged: dict[tuple[str, str], set[str]] = {}
    failed: set[tuple[str, str]] = set()
    unknown: set[tuple[str, str]] = set()
    resolved = replayed = 0
    for buyer_request, attempts in by_request.items():
        oks = {op.order_id for op in attempts if op.outcome == "ok" and op.order_id}
        replayed += sum(1 for op in attempts if op.outcome == "ok" and op.replayed)
        if oks:
            acknowledged[buyer_request] = oks
        elif all(op.outcome == "failed" for op in attempts):
            failed.add(buyer_request)
        else:
            unknown.add(buyer_request)
        for i, op in enumerate(attempts):
            if op.outcome == "unknown" and any(later.outcome != "unknown" for later in attempts[i + 1 :]):
                resolved += 1

    pg_by_request: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for order_id, o in seen.orders.items():
        pg_by_request[(_sale_of(o.sale), o.user, o.request_id)].append(order_id)
    request_ids_in_pg: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (_sale, user, request_id), ids in pg_by_request.items():
        request_ids_in_pg[(user, request_id)] += ids

    for (user, request_id), answered in sorted(acknowledged.items()):
        if len(answered) > 1:
            v["exactly_once"].append(
                f"request {request_id} of {user} was answered with {len(answered)} orders: "
                + ", ".join(sorted(answered))
            )
        for order_id in sorted(answered):
            if order_id not in seen.orders:
                v["acknowledged"].append(
                    f"order {order_id} (request {request_id} of {user}) was acknowledged, PostgreSQL lacks it"
                )
    for (sale, user, request_id), ids in sorted(pg_by_request.items()):
        if len(ids) > 1:
            v["exactly_once"].append(
                f"request {request_id} of {user} in sale {sale} has {len(ids)} orders in PostgreSQL: "
                + ", ".join(sorted(ids))
            )
    for user, request_id in sorted(failed):
        for order_id in request_ids_in_pg.get((user, request_id), []):
            v["not_failed"].append(
                f"request {request_id} of {user} was refused every time, yet PostgreSQL has order {order_id}"
            )

    for op in history:
        if op.status == 500:
            v["no_internal_error"].append(
                f"{op.kind} {op.key} of {op.user} at {op.started:.2f} s was answered 500 {op.code}: "
                "an unhandled error (the service log has its traceback)"
            )

    final: dict[str, str] = {}
    for op in history:
        if op.kind in ("pay", "cancel") and op.outcome == "ok" and op.state:
            final[op.key] = op.state
    for order_id, state in sorted(final.items()):
        found = seen.orders.get(order_id)
        if found is None:
            v["acknowledged"].append(f"order {order_id} was {state} for the client, PostgreSQL lacks it")
        elif found.status != state:
            v["acknowledged_state"].append(
                f"order {order_id}: the client was told {state}, PostgreSQL says {found.status}"
            )

    held: Counter[tuple[str, str]] = Counter()
    paid: Counter[tuple[str, str]] = Counter()
    for order_id, o in seen.orders.items():
        for sku, qty in o.lines.items():
            if o.status == "held":
                held[(o.sale, sku)] += qty
            elif o.status == "paid":
                paid[(o.sale, sku)] += qty
        if lapsed and o.status == "held" and o.pay_by_ms + grace_ms < seen.now_ms:
            v["no_leak"].append(
                f"order {order_id} is still held in PostgreSQL {(seen.now_ms - o.pay_by_ms) / 1000:.1f} s after its deadline"
            )

    # total, reserve, held, paid
    per_sku: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for (engine, sku), (total, reserve) in seen.pg_stock.items():
        s = per_sku[(_sale_of(engine), sku)]
        s[0] += total
        s[1] += reserve
    for (engine, sku), n in held.items():
        per_sku[(_sale_of(engine), sku)][2] += n
    for (engine, sku), n in paid.items():
        per_sku[(_sale_of(engine), sku)][3] += n
    for (sale, sku), (total, reserve, h, p) in sorted(per_sku.items()):
        if h + p > total - reserve:
            v["no_oversell"].append(
                f"{sale}/{sku}: PostgreSQL has {h} held + {p} paid units, only {total - reserve} were for sale ({h + p - total + reserve} oversold)"
            )

    redis_totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for (engine, sku), c in sorted(seen.redis_stock.items()):
        total, avail, h, sold, reserve = (
            c.get(k, 0) for k in ("total", "available", "held", "sold", "reserve")
        )
        if avail + h + sold + reserve != total or min(avail, h, sold, reserve) < 0:
            v["conservation"].append(
                f"{engine}/{sku} in Redis: available {avail} + held {h} + sold {sold} + reserve {reserve} != total {total}"
            )
        pg_total = seen.pg_stock.get((engine, sku), (None, None))[0]
        if pg_total is not None and pg_total != total:
            v["conservation"].append(
                f"{engine}/{sku}: Redis has total {total}, PostgreSQL's stock events {pg_total}"
            )
        if h + sold > total - reserve:
            v["no_oversell"].append(
                f"{engine}/{sku} in Redis: {h} held + {sold} sold > {total - reserve} for sale"
            )
        t = redis_totals[(_sale_of(engine), sku)]
        t[0] += sold
        if lapsed:
            if h:
                v["no_leak"].append(f"{engine}/{sku}: {h} units still held in Redis after every hold lapsed")
            if avail != total - reserve - sold:
                v["no_leak"].append(
                    f"{engine}/{sku}: available {avail} != total {total} - reserve {reserve} - sold {sold}"
                )
    for (sale, sku), (_total, _reserve, _held, p) in sorted(per_sku.items()):
        sold = redis_totals.get((sale, sku), [0])[0]
        if lapsed and sold != p:
            v["no_leak"].append(f"{sale}/{sku}: Redis counts {sold} sold, PostgreSQL has {p} paid")

    if seen.audit is not None and not seen.audit.ok:
        for violation in seen.audit.violations[:LISTED]:
            where = " ".join(x for x in (violation.sale, violation.sku or "", violation.order_id or "") if x)
            v["audit"].append(f"{violation.kind} ({violation.where}) {where}: {violation.detail}")
        if len(seen.audit.violations) > LISTED:
            v["audit"].append(f"… {len(seen.audit.violations) - LISTED} more audit violations")

    return CheckReport(
        violations=v,
        requests=history.counts(),
        order_ids={"acknowledged": len(acknowledged), "failed": len(failed), "unknown": len(unknown)},
        unknown_resolved=resolved,
        replayed=replayed,
        checked_at=time.time(),
    )
