"""The oracle: after a drill, did anything get oversold, lost, duplicated or leaked?

It works over HTTP only. From the merged request log it takes every order the clients saw
acknowledged (a 2xx with an order id), waits until every unpaid hold has lapsed, then asks
the service for its audit (``POST /api/admin/audit`` with those order ids; the service
drains its queue into PostgreSQL first and compares Redis with PostgreSQL). The verdict
holds when:

- **oversold** = 0: no SKU sold or held more than it stocked;
- **lost** = 0: every acknowledged order is in PostgreSQL;
- **duplicates** = 0: none is there twice, and no request id was ever answered with two
  different order ids (a retry must replay, not buy again);
- **limit breaches** = 0: per-user limits held;
- **leaked** = 0, and no hold outlived its TTL: every unit is sold or on sale again;
- **conservation**: sold + available + reserve pool + held == stocked, per SKU;
- the queue **drained** within the audit's wait.

``verdict_from_audit`` is the pure part (tests feed it canned audits); ``run_oracle``
does the waiting and the HTTP call. ``python -m loadtests.oracle`` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests import exit_codes
from loadtests.admin import AdminClient, AdminError, admin_token_from_env

__all__ = [
    "VIOLATION_KINDS",
    "Check",
    "RequestLogSummary",
    "Verdict",
    "merge_request_logs",
    "read_request_log",
    "run_oracle",
    "verdict_from_audit",
]

VIOLATION_KINDS = ("oversold", "lost", "duplicates", "limit_breaches", "leaked")


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
    #: Request ids answered with more than one order id: a client-visible duplicate.
    rid_conflicts: dict[str, list[str]]
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
    by_rid: dict[str, set[str]] = defaultdict(set)
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
            by_rid[str(line.get("rid"))].add(oid)
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
        attempts=attempts, ok=ok, failed=failed, unknown=unknown, replays=replays,
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


def verdict_from_audit(audit: Mapping[str, Any], log: RequestLogSummary) -> Verdict:
    """Judge a finished drill from the service's audit and the clients' request log."""
    violations = audit.get("violations") or {}
    checks: list[Check] = []
    for kind in VIOLATION_KINDS:
        found = list(violations.get(kind) or [])
        if kind == "duplicates" and log.rid_conflicts:
            found += [{"request_id": rid, "order_ids": ids} for rid, ids in log.rid_conflicts.items()]
        checks.append(Check(kind, not found, len(found), _examples(found) if found else ""))

    skus = audit.get("skus") or {}
    broken: list[str] = []
    held: list[str] = []
    for sku, c in skus.items():
        parts = {k: int(c.get(k, 0) or 0) for k in ("available", "held", "sold", "reserve")}
        total = int(c.get("total", 0) or 0)
        if sum(parts.values()) != total or any(v < 0 for v in parts.values()):
            broken.append(f"{sku}: sold {parts['sold']} + available {parts['available']} + reserve "
                          f"{parts['reserve']} + held {parts['held']} != stocked {total}")
        if parts["held"]:
            held.append(f"{sku}: {parts['held']} units still held")
    checks.append(Check("conservation", bool(skus) and not broken, len(broken),
                        "; ".join(broken) if broken else ("" if skus else "the audit listed no SKUs")))
    checks.append(Check("holds_lapsed", not held, len(held), "; ".join(held)))

    drained = bool(audit.get("drained", False))
    checks.append(Check("drained", drained, drained,
                        "" if drained else "the order queue did not drain into PostgreSQL within the audit's wait"))
    orders = audit.get("orders") or {}
    if "redis" in orders and "postgres" in orders:
        same = int(orders["redis"]) == int(orders["postgres"])
        checks.append(Check("orders_match", same, dict(orders),
                            "" if same else "Redis and PostgreSQL hold different numbers of orders"))
    ok_flag = bool(audit.get("ok", False))
    if not ok_flag and all(c.passed for c in checks):
        checks.append(Check("audit_ok", False, False, "the audit reported ok=false without naming a violation"))
    log_view = {
        "acknowledged": len(log.acknowledged), "attempts": log.attempts, "ok": log.ok,
        "failed": log.failed, "unknown": log.unknown, "replays": log.replays, "paid": len(log.paid),
        "failed_by_code": log.failed_by_code,
    }
    return Verdict(tuple(checks), dict(audit), log_view)


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
    audit = admin.audit(log.acknowledged, wait_s)
    # A hold past its TTL may need the service's sweeper to come round: look again briefly.
    while any(int((c or {}).get("held", 0) or 0) for c in (audit.get("skus") or {}).values()) and clock() < deadline:
        sleep(2.0)
        audit = admin.audit(log.acknowledged, wait_s)
    return verdict_from_audit(audit, log)


def format_verdict(verdict: Verdict) -> str:
    rows = [f"{'check':<16} {'result':<6} observed", "-" * 48]
    for c in verdict.checks:
        rows.append(f"{c.name:<16} {'ok' if c.passed else 'FAIL':<6} {c.observed}" + (f"  {c.detail}" if c.detail else ""))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.oracle",
        description="Judge a finished drill: wait for holds to lapse, ask the service's audit about every "
        "acknowledged order in the request logs, and check nothing was oversold, lost, duplicated or leaked. "
        f"Exit {exit_codes.OK} if the invariants held, {exit_codes.INVARIANT_VIOLATED} if not.",
    )
    parser.add_argument("requests", nargs="+", type=Path, help="request logs (requests.jsonl, or per-process files)")
    parser.add_argument("--host", required=True, help="the service, e.g. http://127.0.0.1:8080")
    parser.add_argument("--admin-token", default=admin_token_from_env(), help="admin token (default: $FLASHSALE_ADMIN_TOKEN)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds the audit may wait for the queue to drain")
    args = parser.parse_args(argv)
    try:
        verdict = run_oracle(AdminClient(args.host, args.admin_token), args.requests, wait_s=args.wait,
                             progress=lambda m: print(m, file=sys.stderr))
    except AdminError as exc:
        print(f"oracle: {exc}", file=sys.stderr)
        return exit_codes.RUN_INVALID
    print(format_verdict(verdict))
    return exit_codes.OK if verdict.invariants_held else exit_codes.INVARIANT_VIOLATED


if __name__ == "__main__":
    raise SystemExit(main())
