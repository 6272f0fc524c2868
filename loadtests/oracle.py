"""flashsale's oracle: its audit, read as the kit's ``Truth`` of the backend.

It works over HTTP only. From the history it takes every order the clients saw
acknowledged (an ``ok`` order operation), waits until every unpaid hold has lapsed, then
asks the service for its audit (``POST /api/admin/audit`` with those order ids; the service
drains its queue into PostgreSQL first and compares Redis with PostgreSQL). The audit
becomes a ``Truth`` (``truth_from_audit``): stocked and sold (sold + held) per SKU, and one
named check per violation kind it counts (``VIOLATION_KINDS``) — **oversold**; **lost** (an
acknowledged order missing in PostgreSQL or Redis); **duplicate**; conflict; phantom;
**limit_breach**; **leaked**; stock_mismatch; dead_letter — plus:

- **conservation**: sold + available + reserve pool + held == stocked, per SKU;
- **holds lapsed**: no unit is still held once every unpaid hold's TTL has passed.

The kit judges it (``loadtests.verdict``): oversold also from the stock figures, duplicate
also from the clients' side (no request id answered with two order ids). An audit whose
queue did not drain (``not_drained``) makes the run invalid, not "lost": lost, conflict and
stock_mismatch are then not judged (PostgreSQL is behind, not wrong).

With a sale name, only that sale's violations count (the audit covers every sale).
``python -m loadtests.oracle`` judges a finished run again from its history.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests import exit_codes
from loadtests.admin import AdminClient, AdminError, admin_token_from_env
from loadtests.history import Operation, read_history, summarize_history
from loadtests.verdict import Check, Truth, Verdict, format_verdict, judge

__all__ = [
    "VIOLATION_KINDS",
    "AuditView",
    "Payments",
    "read_audit",
    "read_payments",
    "run_oracle",
    "truth_from_audit",
    "verdict_from_audit",
]

#: The audit's violation kinds (``POST /api/admin/audit``, schema flashsale.audit/1); each must be 0.
VIOLATION_KINDS = (
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
#: Kinds a queue not yet drained into PostgreSQL can cause: not judged until it drains.
NEED_DRAIN = frozenset({"lost", "conflict", "stock_mismatch"})
#: Plural spellings some audits use for the same kinds.
_ALIASES = {"duplicates": "duplicate", "limit_breaches": "limit_breach", "conflicts": "conflict"}
#: The drill's order operation (``loadtests.personas``).
ORDER_OPERATIONS = ("order",)


@dataclass(frozen=True)
class Payments:
    """Payments seen in the history: what was paid, and the last unpaid hold's pay-by."""

    paid: tuple[str, ...]
    #: The latest pay-by instant (epoch ms) of an acknowledged order not seen paid.
    last_unpaid_pay_by_ms: int | None


def read_payments(operations: Iterable[Operation]) -> Payments:
    paid: set[str] = set()
    pay_by: dict[str, int] = {}
    for o in operations:
        if o.f == "pay" and o.type == "ok" and o.value.get("paid_order"):
            paid.add(str(o.value["paid_order"]))
        elif o.f in ORDER_OPERATIONS and o.type == "ok" and o.order and o.value.get("pay_by_ms") is not None:
            pay_by[o.order] = max(pay_by.get(o.order, 0), int(o.value["pay_by_ms"]))
    unpaid = [ms for oid, ms in pay_by.items() if oid not in paid]
    return Payments(tuple(sorted(paid)), max(unpaid) if unpaid else None)


def _examples(items: list[Any], n: int = 5) -> str:
    return json.dumps(items[:n], default=str) + (f" … ({len(items)} in all)" if len(items) > n else "")


@dataclass(frozen=True)
class AuditView:
    """An audit answer reduced to what the verdict needs, for one sale or for all."""

    violations: dict[str, list[Any]]
    counts: dict[str, int]
    skus: dict[str, dict[str, int]]
    drained: bool | None
    ok: bool


def read_audit(audit: Mapping[str, Any], sale: str | None = None) -> AuditView:
    """Normalise an audit answer: violations as a list of ``{"kind", "sale", …}`` with exact
    ``violations_by_kind`` (flashsale.audit/1), or as ``{kind: [...]}``; SKUs as a list of
    ``{"sale", "sku", …}`` or a ``{sku: {...}}`` map. With ``sale``, only that sale counts
    (other sales in the same Redis are not this drill's business) — except violations the
    audit did not list in full, which count against it (they cannot be told apart)."""
    raw = audit.get("violations")
    if raw is None:
        raw = []
    violations: dict[str, list[Any]] = {k: [] for k in VIOLATION_KINDS}
    if isinstance(raw, Mapping):
        for name, items in raw.items():
            violations.setdefault(_ALIASES.get(str(name), str(name)), []).extend(items or [])
    else:
        for v in raw:
            kind = _ALIASES.get(str(v.get("kind")), str(v.get("kind")))
            if sale is None or v.get("sale") in (sale, None):
                violations.setdefault(kind, []).append(v)
    counts = {k: len(v) for k, v in violations.items()}
    exact = audit.get("violations_by_kind")
    if isinstance(exact, Mapping) and not isinstance(raw, Mapping):
        listed_all: dict[str, int] = defaultdict(int)
        for v in raw:
            listed_all[_ALIASES.get(str(v.get("kind")), str(v.get("kind")))] += 1
        for name, n in exact.items():
            kind = _ALIASES.get(str(name), str(name))
            counts[kind] = counts.get(kind, 0) + max(int(n) - listed_all.get(kind, 0), 0)
    skus: dict[str, dict[str, int]] = {}
    raw_skus = audit.get("skus") or {}
    entries = (
        raw_skus.items() if isinstance(raw_skus, Mapping) else ((str(s.get("sku")), s) for s in raw_skus)
    )
    for sku, c in entries:
        if sale is not None and isinstance(c, Mapping) and c.get("sale") not in (sale, None):
            continue
        skus[sku] = {k: int(c.get(k, 0) or 0) for k in ("total", "available", "held", "sold", "reserve")}
    drain = audit.get("drain")
    drained = drain.get("drained") if isinstance(drain, Mapping) else audit.get("drained")
    return AuditView(
        violations, counts, skus, None if drained is None else bool(drained), bool(audit.get("ok", False))
    )


def truth_from_audit(audit: Mapping[str, Any], *, sale: str | None = None, paid: int | None = None) -> Truth:
    """The audit as a ``Truth``: stock figures per SKU and a named check per violation kind."""
    view = read_audit(audit, sale)
    checks: list[Check] = []
    for kind in view.violations:
        if kind == "not_drained":
            continue  # not a violation: the run's truth is incomplete (below)
        found = list(view.violations[kind])
        count = view.counts.get(kind, len(found))
        checks.append(Check(kind, count == 0, count, _examples(found) if count else "", kind in NEED_DRAIN))
    broken: list[str] = []
    held: list[str] = []
    for sku, c in view.skus.items():
        parts = {k: c[k] for k in ("sold", "available", "reserve", "held")}
        if sum(parts.values()) != c["total"] or any(v < 0 for v in parts.values()):
            broken.append(
                f"{sku}: sold {parts['sold']} + available {parts['available']} + reserve "
                f"{parts['reserve']} + held {parts['held']} != stocked {c['total']}"
            )
        if parts["held"]:
            held.append(f"{sku}: {parts['held']} units still held")
    checks.append(
        Check(
            "conservation",
            bool(view.skus) and not broken,
            len(broken),
            "; ".join(broken) if broken else ("" if view.skus else "the audit listed no SKUs for this sale"),
        )
    )
    checks.append(Check("holds_lapsed", not held, len(held), "; ".join(held)))
    undrained = view.counts.get("not_drained", 0)
    drained = view.drained is not False and not undrained
    if not view.ok and drained and all(c.passed for c in checks) and sale is None:
        checks.append(
            Check("audit_ok", False, False, "the audit reported ok=false without naming a violation")
        )
    drain = audit.get("drain")
    outstanding = drain.get("outstanding") if isinstance(drain, Mapping) else None
    detail = ""
    if not drained:
        detail = (
            "the order queue did not drain into PostgreSQL within the audit's wait"
            + (f": {json.dumps(outstanding)} entries outstanding" if outstanding else "")
            + " — is `flashsale worker` running?"
        )
    return Truth(
        stocked={sku: c["total"] for sku, c in view.skus.items()},
        sold={sku: c["sold"] + c["held"] for sku, c in view.skus.items()},
        recorded=None,  # the audit checks acknowledged orders itself: its "lost" check
        checks=tuple(checks),
        drained=drained,
        drain_detail=detail,
        figures={} if paid is None else {"paid": paid},
        evidence={
            "audit": {k: audit[k] for k in audit if k != "violations"}
            | {"violations_listed": sum(len(v) for v in view.violations.values())}
        },
    )


def verdict_from_audit(
    audit: Mapping[str, Any], operations: Iterable[Operation], *, sale: str | None = None
) -> Verdict:
    """Judge a finished drill from the service's audit and the clients' history."""
    ops = list(operations)
    told = summarize_history(ops, ORDER_OPERATIONS)
    return judge(truth_from_audit(audit, sale=sale, paid=len(read_payments(ops).paid)), told)


def run_oracle(
    admin: AdminClient,
    history: Iterable[Path],
    *,
    wait_s: float = 60.0,
    lapse_grace_s: float = 2.0,
    max_lapse_wait_s: float = 120.0,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] = lambda _m: None,
    sale: str | None = None,
) -> Truth:
    """Wait for holds to lapse, ask for the audit, read it as a Truth. Raises ``AdminError``
    if the service cannot be asked (the caller reports the run as not judged)."""
    ops = list(read_history(history))
    told = summarize_history(ops, ORDER_OPERATIONS)
    payments = read_payments(ops)
    deadline = clock() + max_lapse_wait_s
    if payments.last_unpaid_pay_by_ms is not None:
        lapse_at = payments.last_unpaid_pay_by_ms / 1000.0 + lapse_grace_s
        if lapse_at > clock():
            progress(f"waiting {lapse_at - clock():.0f}s for the last unpaid hold to lapse")
            sleep(max(min(lapse_at, deadline) - clock(), 0.0))
    progress(f"auditing {len(told.acknowledged)} acknowledged orders (drain wait up to {wait_s:.0f}s)")
    audit = audit_in_chunks(admin, told.acknowledged, wait_s)
    # A hold past its TTL may need the service's sweeper to come round: look again briefly.
    while any(c["held"] for c in read_audit(audit, sale).skus.values()) and clock() < deadline:
        sleep(2.0)
        audit = audit_in_chunks(admin, told.acknowledged, wait_s)
    return truth_from_audit(audit, sale=sale, paid=len(payments.paid))


#: Order ids per audit call: keeps each body well under the service's 16 KiB request limit.
AUDIT_CHUNK_BYTES = 12_000


def audit_in_chunks(admin: AdminClient, acknowledged: Sequence[str], wait_s: float) -> dict[str, Any]:
    """One audit for any number of acknowledged ids: the first call waits for the drain, the
    rest check their share of the ids; "lost" findings of every call are put together, the
    rest (stock, drain, other kinds) comes from the last call, the freshest."""
    chunks: list[list[str]] = [[]]
    size = 0
    for oid in acknowledged:
        if chunks[-1] and size + len(oid) + 4 > AUDIT_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(oid)
        size += len(oid) + 4
    answers = [admin.audit(chunk, wait_s if i == 0 else min(wait_s, 5.0)) for i, chunk in enumerate(chunks)]
    if len(answers) == 1:
        return dict(answers[0])
    merged = dict(answers[-1])
    raw = merged.get("violations")
    if isinstance(raw, list):
        seen: set[str] = set()
        lost: list[Any] = []
        for answer in answers:
            for v in answer.get("violations") or []:
                key = json.dumps(v, sort_keys=True)
                if v.get("kind") == "lost" and key not in seen:
                    seen.add(key)
                    lost.append(v)
        merged["violations"] = [v for v in raw if v.get("kind") != "lost"] + lost
        by_kind = dict(merged.get("violations_by_kind") or {})
        by_kind["lost"] = len(lost)
        merged["violations_by_kind"] = by_kind
        merged["ok"] = all(a.get("ok", False) for a in answers)
    merged["audit_calls"] = len(answers)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.oracle",
        description="Judge a finished drill again: wait for holds to lapse, ask the service's audit about every "
        "acknowledged order in the history, and check nothing was oversold, lost, duplicated or leaked. "
        f"Exit {exit_codes.OK} if the invariants held, {exit_codes.INVARIANT_VIOLATED} if not, "
        f"{exit_codes.RUN_INVALID} if the service could not be asked or its queue had not drained.",
    )
    parser.add_argument(
        "requests", nargs="+", type=Path, help="histories (requests.jsonl, or per-process files)"
    )
    parser.add_argument("--host", required=True, help="the service, e.g. http://127.0.0.1:8080")
    parser.add_argument(
        "--admin-token", default=admin_token_from_env(), help="admin token (default: $FLASHSALE_ADMIN_TOKEN)"
    )
    parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds the audit may wait for the queue to drain"
    )
    parser.add_argument(
        "--sale", default=None, help="judge only this sale (default: every sale the audit covers)"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exit_codes.USAGE if exc.code else exit_codes.OK
    try:
        truth = run_oracle(
            AdminClient(args.host, args.admin_token),
            args.requests,
            wait_s=args.wait,
            progress=lambda m: print(m, file=sys.stderr),
            sale=args.sale,
        )
    except AdminError as exc:
        print(f"oracle: {exc}", file=sys.stderr)
        return exit_codes.RUN_INVALID
    verdict = judge(truth, summarize_history(read_history(args.requests), ORDER_OPERATIONS))
    print(format_verdict(verdict))
    if not verdict.invariants_held:
        return exit_codes.INVARIANT_VIOLATED
    return exit_codes.OK if verdict.drained else exit_codes.RUN_INVALID


if __name__ == "__main__":
    raise SystemExit(main())
