"""The oracle: after a drill, did anything get oversold, lost, duplicated or leaked?

It works over HTTP only. From the merged request log it takes every order the clients saw
acknowledged (a 2xx with an order id), waits until every unpaid hold has lapsed, then asks
the service for its audit (``POST /api/admin/audit`` with those order ids; the service
drains its queue into PostgreSQL first and compares Redis with PostgreSQL). The verdict
holds when:

- every violation kind the audit counts is 0 (``VIOLATION_KINDS``): **oversold**; **lost**
  (an acknowledged order missing in PostgreSQL or Redis); **duplicate** (also from the
  clients' side: no request id was ever answered with two different order ids — a retry
  must replay, not buy again); conflict; phantom; **limit_breach**; **leaked**;
  stock_mismatch; dead_letter; **not_drained** (the queue drained within the wait);
- **conservation**: sold + available + reserve pool + held == stocked, per SKU;
- **holds lapsed**: no unit is still held once every unpaid hold's TTL has passed.

With a sale name, only that sale's violations count (the audit covers every sale).

``verdict_from_audit`` is the pure part (tests feed it canned audits); ``run_oracle``
does the waiting and the HTTP call. ``python -m loadtests.oracle`` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests import exit_codes
from loadtests.admin import AdminClient, AdminError, admin_token_from_env

__all__ = [
    "VIOLATION_KINDS",
    "AuditView",
    "Check",
    "RequestLogSummary",
    "Verdict",
    "format_verdict",
    "merge_request_logs",
    "read_audit",
    "read_request_log",
    "run_oracle",
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
#: Plural spellings some audits use for the same kinds.
_ALIASES = {"duplicates": "duplicate", "limit_breaches": "limit_breach", "conflicts": "conflict"}


@dataclass(frozen=True)
class RequestLogSummary:
    """What the clients saw, from the request log of every process."""

    acknowledged: tuple[str, ...]
    attempts: int
    ok: int
    failed: int
    unknown: int
    replays: int
    paid: tuple[str, ...]
    #: (buyer, request id) answered with more than one order id: a client-visible
    #: duplicate. Request ids are each buyer's own, so two buyers' orders under one id are not.
    rid_conflicts: dict[tuple[str, str], list[str]]
    #: The latest pay-by instant (epoch ms) of an acknowledged order not seen paid.
    last_unpaid_pay_by_ms: int | None
    failed_by_code: dict[str, int] = field(default_factory=dict)


def _lines(paths: Iterable[Path]) -> Iterable[dict[str, Any]]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for raw in f:
                raw = raw.strip()
                if raw:
                    yield json.loads(raw)


def merge_request_logs(paths: Iterable[Path], out: Path) -> int:
    """Concatenate per-process request logs (e.g. copied from several machines) into one."""
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for line in _lines(paths):
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
            n += 1
    return n


def read_request_log(paths: Iterable[Path]) -> RequestLogSummary:
    acked: dict[str, None] = {}
    by_rid: dict[tuple[str, str], set[str]] = defaultdict(set)
    paid: set[str] = set()
    pay_by: dict[str, int] = {}
    failed_by_code: dict[str, int] = defaultdict(int)
    attempts = ok = failed = unknown = replays = 0
    for line in _lines(paths):
        if line.get("kind") == "pay":
            if line.get("outcome") == "paid":
                paid.add(str(line["order_id"]))
            continue
        if line.get("kind") != "order":
            continue
        attempts += 1
        outcome = line.get("outcome")
        if outcome == "ok" and line.get("order_id"):
            ok += 1
            oid = str(line["order_id"])
            acked[oid] = None
            by_rid[(str(line.get("user")), str(line.get("rid")))].add(oid)
            replays += bool(line.get("replayed"))
            if line.get("pay_by_ms") is not None:
                pay_by[oid] = max(pay_by.get(oid, 0), int(line["pay_by_ms"]))
        elif outcome == "failed":
            failed += 1
            failed_by_code[f"{line.get('status')}:{line.get('code') or '-'}"] += 1
        else:
            unknown += 1
    unpaid = [ms for oid, ms in pay_by.items() if oid not in paid]
    return RequestLogSummary(
        acknowledged=tuple(acked),
        attempts=attempts,
        ok=ok,
        failed=failed,
        unknown=unknown,
        replays=replays,
        paid=tuple(sorted(paid)),
        rid_conflicts={rid: sorted(ids) for rid, ids in by_rid.items() if len(ids) > 1},
        last_unpaid_pay_by_ms=max(unpaid) if unpaid else None,
        failed_by_code=dict(failed_by_code),
    )


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    observed: Any
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    checks: tuple[Check, ...]
    audit: dict[str, Any]
    log: dict[str, Any]

    @property
    def invariants_held(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "invariants_held": self.invariants_held,
            "checks": [asdict(c) for c in self.checks],
            "audit": self.audit,
            "log": self.log,
        }


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


def verdict_from_audit(
    audit: Mapping[str, Any], log: RequestLogSummary, *, sale: str | None = None
) -> Verdict:
    """Judge a finished drill from the service's audit and the clients' request log."""
    view = read_audit(audit, sale)
    checks: list[Check] = []
    for kind in view.violations:
        found = list(view.violations[kind])
        count = view.counts.get(kind, len(found))
        if kind == "duplicate" and log.rid_conflicts:
            conflicts = [
                {"user": user, "request_id": rid, "order_ids": ids, "seen_by": "clients"}
                for (user, rid), ids in log.rid_conflicts.items()
            ]
            found += conflicts
            count += len(conflicts)
        checks.append(Check(kind, count == 0, count, _examples(found) if count else ""))

    broken: list[str] = []
    held: list[str] = []
    for sku, parts in view.skus.items():
        total = parts.pop("total")
        if sum(parts.values()) != total or any(v < 0 for v in parts.values()):
            broken.append(
                f"{sku}: sold {parts['sold']} + available {parts['available']} + reserve "
                f"{parts['reserve']} + held {parts['held']} != stocked {total}"
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
    if view.drained is False and not view.counts.get("not_drained"):
        checks.append(
            Check(
                "drained",
                False,
                False,
                "the order queue did not drain into PostgreSQL within the audit's wait",
            )
        )
    if not view.ok and all(c.passed for c in checks) and sale is None:
        checks.append(
            Check("audit_ok", False, False, "the audit reported ok=false without naming a violation")
        )
    log_view = {
        "acknowledged": len(log.acknowledged),
        "attempts": log.attempts,
        "ok": log.ok,
        "failed": log.failed,
        "unknown": log.unknown,
        "replays": log.replays,
        "paid": len(log.paid),
        "failed_by_code": log.failed_by_code,
    }
    return Verdict(
        tuple(checks),
        {k: audit[k] for k in audit if k != "violations"}
        | {"violations_listed": sum(len(v) for v in view.violations.values())},
        log_view,
    )


def run_oracle(
    admin: AdminClient,
    request_logs: Iterable[Path],
    *,
    wait_s: float = 60.0,
    lapse_grace_s: float = 2.0,
    max_lapse_wait_s: float = 120.0,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] = lambda _m: None,
    sale: str | None = None,
) -> Verdict:
    """Wait for holds to lapse, ask for the audit, judge. Raises ``AdminError`` if the
    service cannot be asked (the caller reports the run as not judged)."""
    log = read_request_log(list(request_logs))
    deadline = clock() + max_lapse_wait_s
    if log.last_unpaid_pay_by_ms is not None:
        lapse_at = log.last_unpaid_pay_by_ms / 1000.0 + lapse_grace_s
        if lapse_at > clock():
            progress(f"waiting {lapse_at - clock():.0f}s for the last unpaid hold to lapse")
            sleep(max(min(lapse_at, deadline) - clock(), 0.0))
    progress(f"auditing {len(log.acknowledged)} acknowledged orders (drain wait up to {wait_s:.0f}s)")
    audit = audit_in_chunks(admin, log.acknowledged, wait_s)
    # A hold past its TTL may need the service's sweeper to come round: look again briefly.
    while any(c["held"] for c in read_audit(audit, sale).skus.values()) and clock() < deadline:
        sleep(2.0)
        audit = audit_in_chunks(admin, log.acknowledged, wait_s)
    return verdict_from_audit(audit, log, sale=sale)


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


def format_verdict(verdict: Verdict) -> str:
    rows = [f"{'check':<16} {'result':<6} observed", "-" * 48]
    for c in verdict.checks:
        rows.append(
            f"{c.name:<16} {'ok' if c.passed else 'FAIL':<6} {c.observed}"
            + (f"  {c.detail}" if c.detail else "")
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.oracle",
        description="Judge a finished drill: wait for holds to lapse, ask the service's audit about every "
        "acknowledged order in the request logs, and check nothing was oversold, lost, duplicated or leaked. "
        f"Exit {exit_codes.OK} if the invariants held, {exit_codes.INVARIANT_VIOLATED} if not.",
    )
    parser.add_argument(
        "requests", nargs="+", type=Path, help="request logs (requests.jsonl, or per-process files)"
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
    args = parser.parse_args(argv)
    try:
        verdict = run_oracle(
            AdminClient(args.host, args.admin_token),
            args.requests,
            wait_s=args.wait,
            progress=lambda m: print(m, file=sys.stderr),
            sale=args.sale,
        )
    except AdminError as exc:
        print(f"oracle: {exc}", file=sys.stderr)
        return exit_codes.RUN_INVALID
    print(format_verdict(verdict))
    return exit_codes.OK if verdict.invariants_held else exit_codes.INVARIANT_VIOLATED


if __name__ == "__main__":
    raise SystemExit(main())
