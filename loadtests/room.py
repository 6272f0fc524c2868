"""flashsale's waiting room as its drill judges it: the room's record (``GET
/api/admin/sales/{sale}/room``), the shuffle at T0 replayed from its documented algorithm
(docs/waiting-room.md, "Auditing a room"), and the oracle's room checks — named checks of
the kit (``loadtests.verdict.Check``), each from the record and the clients' history:

- **room_shuffle**: the buyers who joined before T0 hold one shuffle of the pre-queue: the
  Park–Miller Fisher–Yates replayed from the recorded seed and arrival order gives exactly
  their recorded positions, and every client told "pre" is in the pre-queue;
- **room_fifo**: later joiners queue in arrival order (positions follow joining times) and
  buyers are served in queue order: nobody was admitted while a buyer ahead of them, asking
  for the same SKUs, still waited;
- **room_tickets**: no order without a ticket succeeded: every acknowledged order was sent
  with its buyer's own ticket and is the one that ticket was spent on (the record names its
  request id); every attempt to skip the room was refused;
- **room_admission_bound**: at every admission, the tickets out for a SKU never exceeded the
  units that could be available then (stocked minus what acknowledged orders held or bought,
  from the clients' history) times the oversubscription factor; and, without
  oversubscription, no admitted buyer's order was refused "sold out";
- **room_told**: every waiting buyer of a sold-out SKU was told within ``told_within_s`` of
  the sell-out; "told" is when the answer saying so reached the buyer. The sell-out is the
  moment the SKU's last unit was paid: exact from the record (``sold_out_at_ms``, from the
  service's PostgreSQL record), else from the history — when the last acknowledged payment
  of it was sent, which makes the delay an upper bound. A poll sent after the sell-out that
  still said "waiting" fails it too, and so does a buyer told to come back later than the
  limit allows, or told "sold out" while units were left.

Times from the record are Redis's clock, those of the history the load generator's: where
the two meet (room_admission_bound, and room_told with an exact sell-out) they are compared
with ``CLOCK_MARGIN_S`` of slack, and agree when both run on one machine, as a rehearsal does.

``python -m loadtests.oracle --sale …`` runs these checks again for a sale behind its room.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtests.history import Operation
from loadtests.verdict import Check

__all__ = [
    "CLOCK_MARGIN_S",
    "MODULUS",
    "ROOM_CHECKS",
    "ROOM_OPERATIONS",
    "RoomAnswer",
    "RoomBuyer",
    "RoomRecord",
    "room_answers",
    "room_checks",
    "sell_outs",
    "replay_shuffle",
]

#: The Park–Miller modulus, 2^31 - 1.
MODULUS = 2147483647
#: The room's calls in the history (flashsale's personas name them so).
ROOM_OPERATIONS = ("room_join", "room_poll")
ROOM_CHECKS = ("room_shuffle", "room_fifo", "room_tickets", "room_admission_bound", "room_told")
#: Slack when the record's times (Redis's clock) meet the history's (the load generator's).
CLOCK_MARGIN_S = 0.1
_WAITING = frozenset({"pre", "waiting"})
_ADMITTED = frozenset({"admitted", "used", "expired"})


def replay_shuffle(pre_queue: Sequence[str], seed: int) -> list[str]:
    """The order the room gave the pre-queue at T0, from the documented algorithm: a
    Fisher–Yates shuffle from the back, each index drawn from a Park–Miller generator
    (x ← 16807·x mod 2^31−1, starting at the seed; index = x mod i for i = n … 2)."""
    order = list(pre_queue)
    x = seed
    for i in range(len(order), 1, -1):
        x = (x * 16807) % MODULUS
        j = x % i
        order[i - 1], order[j] = order[j], order[i - 1]
    return order


# -- the record ----------------------------------------------------------------------------------
def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class RoomBuyer:
    """One buyer's record in the room (times in Redis's epoch ms)."""

    account: str
    state: str
    skus: tuple[str, ...]
    joined_ms: int
    position: int | None = None
    admitted_ms: int | None = None
    ticket_expires_ms: int | None = None
    used_ms: int | None = None
    request_id: str | None = None
    told_ms: int | None = None
    told_after_ms: int | None = None


@dataclass(frozen=True)
class RoomRecord:
    """The room's record as ``GET /api/admin/sales/{sale}/room`` answers it."""

    sale: str
    opens_at_ms: int
    seed: int
    oversubscribe: float
    rate_per_s: float
    shuffled: bool
    pre_queue: tuple[str, ...]
    buyers: Mapping[str, RoomBuyer]
    counters: Mapping[str, int] = field(default_factory=dict)
    #: SKU -> when its last unit was paid, for the SKUs sold out (None: the service has no
    #: database to say).
    sold_out_at_ms: Mapping[str, int] | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> RoomRecord:
        buyers = {
            str(account): RoomBuyer(
                account=str(account),
                state=str(b.get("state", "")),
                skus=tuple(str(s) for s in b.get("skus") or ()),
                joined_ms=int(b.get("joined_ms", 0)),
                position=_opt_int(b.get("position")) or None,  # 0: no place yet (pre-queue)
                admitted_ms=_opt_int(b.get("admitted_ms")),
                ticket_expires_ms=_opt_int(b.get("ticket_expires_ms")),
                used_ms=_opt_int(b.get("used_ms")),
                request_id=None if b.get("request_id") is None else str(b["request_id"]),
                told_ms=_opt_int(b.get("told_ms")),
                told_after_ms=_opt_int(b.get("told_after_ms")),
            )
            for account, b in (body.get("buyers") or {}).items()
        }
        return cls(
            sale=str(body.get("sale", "")),
            opens_at_ms=int(body.get("opens_at_ms", 0)),
            seed=int(body.get("seed", 0)),
            oversubscribe=float(body.get("oversubscribe", 1.0)),
            rate_per_s=float(body.get("rate_per_s", 0.0)),
            shuffled=bool(body.get("shuffled", False)),
            pre_queue=tuple(str(b) for b in body.get("pre_queue") or ()),
            buyers=buyers,
            counters={str(k): int(v) for k, v in (body.get("counters") or {}).items()},
            sold_out_at_ms=(
                None
                if body.get("sold_out_at_ms") is None
                else {str(k): int(v) for k, v in body["sold_out_at_ms"].items()}
            ),
        )


# -- the history -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoomAnswer:
    """One answer of the room to a client (join or poll), in the load generator's time."""

    account: str
    skus: tuple[str, ...]
    invoke: float
    complete: float
    state: str
    poll_after_s: float | None


def room_answers(operations: Iterable[Operation]) -> dict[str, list[RoomAnswer]]:
    """Every answer the room gave, per account, in the order they were asked."""
    out: dict[str, list[RoomAnswer]] = defaultdict(list)
    for o in operations:
        if o.f not in ROOM_OPERATIONS or o.type != "ok" or not o.value.get("account"):
            continue
        poll = o.value.get("poll_after_ms")
        skus = o.value.get("skus") or ([o.item] if o.item else [])
        out[str(o.value["account"])].append(
            RoomAnswer(
                str(o.value["account"]),
                tuple(str(s) for s in skus),
                o.invoke,
                o.complete,
                str(o.value.get("state", "")),
                None if poll is None else float(poll) / 1000,
            )
        )
    for answers in out.values():
        answers.sort(key=lambda a: a.invoke)
    return out


@dataclass(frozen=True)
class _Order:
    order: str
    sku: str
    units: int
    complete: float
    pay_by_s: float | None


def _orders(operations: Sequence[Operation]) -> tuple[dict[str, _Order], dict[str, tuple[float, float]]]:
    """Acknowledged orders by id, and the (invoke, complete) of each one's acknowledged payment."""
    orders: dict[str, _Order] = {}
    paid: dict[str, tuple[float, float]] = {}
    for o in operations:
        if o.f == "order" and o.type == "ok" and o.order and o.item and o.order not in orders:
            pay_by = o.value.get("pay_by_ms")
            orders[o.order] = _Order(
                o.order, o.item, o.units or 1, o.complete, None if pay_by is None else float(pay_by) / 1000
            )
        elif o.f == "pay" and o.type == "ok" and o.value.get("paid_order"):
            key = str(o.value["paid_order"])
            paid[key] = (o.invoke, o.complete) if key not in paid else min(paid[key], (o.invoke, o.complete))
    return orders, paid


def sell_outs(operations: Sequence[Operation], sold_out: Iterable[str]) -> dict[str, tuple[float, float]]:
    """When each of the ``sold_out`` SKUs sold its last unit: the last acknowledged payment of
    it was sent at the first time and answered by the second (load generator's clock). A SKU
    with no acknowledged payment is left out (its moment is not known)."""
    orders, paid = _orders(operations)
    out: dict[str, tuple[float, float]] = {}
    wanted = set(sold_out)
    for order_id, (invoke, complete) in paid.items():
        order = orders.get(order_id)
        if order is None or order.sku not in wanted:
            continue
        lo, hi = out.get(order.sku, (invoke, complete))
        out[order.sku] = (max(lo, invoke), max(hi, complete))
    return out


# -- the checks ----------------------------------------------------------------------------------
def _examples(items: Sequence[Any], n: int = 5) -> str:
    return "; ".join(str(i) for i in items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def _check(name: str, problems: Sequence[Any], what: str = "") -> Check:
    return Check(name, not problems, len(problems), _examples(problems) if problems else what)


def check_shuffle(record: RoomRecord, answers: Mapping[str, Sequence[RoomAnswer]]) -> Check:
    pre = list(record.pre_queue)
    if not pre:
        return Check("room_shuffle", False, None, "not judged: nobody joined before T0")
    problems: list[str] = [f"{b} is in the pre-queue {n} times" for b, n in Counter(pre).items() if n > 1]
    if not record.shuffled:
        problems.append("the pre-queue was never shuffled (no call reached the room after T0)")
    order = replay_shuffle(pre, record.seed)
    place = {b: i + 1 for i, b in enumerate(order)}
    # A pre-queue buyer whose ticket lapsed joined again at the back: its T0 place is gone.
    kept = [
        record.buyers[b]
        for b in order
        if b in record.buyers
        and record.buyers[b].joined_ms < record.opens_at_ms
        and record.buyers[b].position is not None
    ]
    if kept:
        base = Counter((b.position or 0) - place[b.account] for b in kept).most_common(1)[0][0]
        problems += [
            f"{b.account} holds place {b.position}, the replayed shuffle gives {base + place[b.account]}"
            for b in kept
            if (b.position or 0) - place[b.account] != base
        ]
    in_pre = set(pre)
    told_pre = sorted(a for a, seen in answers.items() if any(x.state == "pre" for x in seen))
    problems += [f"{a} was told 'pre' but is not in the pre-queue" for a in told_pre if a not in in_pre]
    return _check(
        "room_shuffle",
        problems,
        f"{len(kept)} pre-T0 joiners hold the places the replayed shuffle (seed {record.seed}) gives",
    )


def _resolved_ms(b: RoomBuyer) -> float | None:
    """When the buyer stopped waiting: admitted, or told sold out; None: not known (sent
    away as sold out without polling since); inf: still waiting."""
    if b.admitted_ms is not None:
        return float(b.admitted_ms)
    if b.told_ms is not None:
        return float(b.told_ms)
    if b.state == "sold_out":
        return None
    return math.inf


def check_fifo(record: RoomRecord) -> Check:
    problems: list[str] = []
    placed = sorted(
        (b for b in record.buyers.values() if b.position is not None), key=lambda b: b.position or 0
    )
    later = [b for b in placed if b.joined_ms >= record.opens_at_ms]
    for before, after in zip(later, later[1:]):
        if after.joined_ms < before.joined_ms:
            problems.append(
                f"{after.account} joined {before.joined_ms - after.joined_ms} ms before {before.account} "
                f"but stands behind (places {after.position} and {before.position})"
            )
    by_skus: dict[frozenset[str], list[RoomBuyer]] = defaultdict(list)
    for b in placed:
        by_skus[frozenset(b.skus)].append(b)
    for group in by_skus.values():
        ahead_until, ahead = -math.inf, ""
        for b in group:
            if b.admitted_ms is not None and ahead_until > b.admitted_ms:
                problems.append(
                    f"{b.account} (place {b.position}) was admitted while {ahead} ahead of it still waited"
                )
            resolved = _resolved_ms(b)
            if resolved is not None and resolved > ahead_until:
                ahead_until, ahead = resolved, f"{b.account} (place {b.position})"
    return _check("room_fifo", problems, f"{len(placed)} buyers served in queue order")


def check_tickets(record: RoomRecord, operations: Sequence[Operation]) -> tuple[Check, dict[str, Any]]:
    problems: list[str] = []
    skips: dict[str, Counter[str]] = defaultdict(Counter)
    seen: set[tuple[str, str | None]] = set()
    for o in operations:
        if o.f != "order":
            continue
        ticket = str(o.value.get("ticket", ""))
        if ticket and ticket != "own":
            skips[ticket][f"{o.status}:{o.code}" if o.code else str(o.status)] += 1
        if o.type != "ok" or not o.order:
            continue
        account = str(o.value.get("account", ""))
        if (account, o.key) in seen:
            continue
        seen.add((account, o.key))
        if ticket != "own":
            problems.append(
                f"order {o.order} ({account or o.value.get('user')}) acknowledged with ticket {ticket or 'none'!r}"
            )
            continue
        buyer = record.buyers.get(account)
        if buyer is None or buyer.request_id != o.key:
            spent = (
                "no ticket" if buyer is None or buyer.request_id is None else f"request {buyer.request_id}"
            )
            problems.append(
                f"order {o.order} (request {o.key}) of {account}: its ticket was spent on {spent}"
            )
    figures = {mode: dict(sorted(codes.items())) for mode, codes in sorted(skips.items())}
    refused = sum(n for codes in skips.values() for code, n in codes.items() if code[:1] == "4")
    attempts = sum(sum(codes.values()) for codes in skips.values())
    return (
        _check(
            "room_tickets",
            problems,
            f"{len(seen)} acknowledged orders each spent its buyer's own ticket; "
            f"{refused} of {attempts} attempts to skip the room refused",
        ),
        figures,
    )


def _sweep(events: list[tuple[float, int]], at: Sequence[float]) -> list[int]:
    """The running sum of ``events`` (time, step) counted up to and including each of the
    sorted instants ``at``."""
    events.sort()
    out, total, i = [], 0, 0
    for t in at:
        while i < len(events) and events[i][0] <= t:
            total += events[i][1]
            i += 1
        out.append(total)
    return out


def check_admission_bound(
    record: RoomRecord, operations: Sequence[Operation], stocked: Mapping[str, int]
) -> Check:
    orders, paid = _orders(operations)
    factor = record.oversubscribe
    problems: list[str] = []
    # Units of a SKU surely held or sold at t: acknowledged orders answered by then, paid, or
    # whose hold cannot have lapsed yet.
    committed: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for o in orders.values():
        start = o.complete + CLOCK_MARGIN_S
        committed[o.sku].append((start, o.units))
        if o.order not in paid:
            lapse = math.inf if o.pay_by_s is None else o.pay_by_s - CLOCK_MARGIN_S
            committed[o.sku].append((max(start, lapse), -o.units))
    # Tickets out: from admission to use, or to expiry if never used.
    tickets: dict[str, list[tuple[float, int]]] = defaultdict(list)
    admissions: dict[str, list[float]] = defaultdict(list)
    for b in record.buyers.values():
        if b.admitted_ms is None:
            continue
        end = b.used_ms if b.used_ms is not None else b.ticket_expires_ms
        for sku in b.skus:
            tickets[sku] += [(b.admitted_ms / 1000, 1), (math.inf if end is None else end / 1000, -1)]
            admissions[sku].append(b.admitted_ms / 1000)
    for sku, times in admissions.items():
        if sku not in stocked:
            continue
        times.sort()
        for t, out, held in zip(times, _sweep(tickets[sku], times), _sweep(committed[sku], times)):
            could = max(0, stocked[sku] - held)
            bound = math.floor(could * factor + 1e-9)
            if out > bound:
                problems.append(
                    f"{sku}: {out} tickets out at {t:.3f} with at most {could} units available "
                    f"(× {factor:g} = {bound})"
                )
    refused = [
        o for o in operations if o.f == "order" and o.value.get("ticket") == "own" and o.code == "sold_out"
    ]
    if factor <= 1 and refused:
        problems.append(
            f"{len(refused)} admitted buyers' orders were refused 'sold out' although the room admits "
            f"no more buyers than units (e.g. {refused[0].value.get('account')})"
        )
    return _check(
        "room_admission_bound",
        problems,
        f"tickets out never exceeded the units that could be available × {factor:g}",
    )


def _percentiles(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 1)

    return {
        "count": len(ordered),
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": round(ordered[-1], 1),
    }


def check_told(
    answers: Mapping[str, Sequence[RoomAnswer]],
    sold_at: Mapping[str, tuple[float, float]],
    within_s: float,
    not_sold: Iterable[str] = (),
) -> tuple[Check, dict[str, Any]]:
    """See the module docstring (room_told). ``sold_at``: SKU -> (earliest, latest) moment
    it sold out (``sell_outs``); ``not_sold``: SKUs that had not sold out at the end (a
    buyer of one told "sold out" was sent away wrongly)."""
    not_sold = set(not_sold)
    problems: list[str] = []
    delays_ms: list[float] = []
    unreached = joined_after = 0
    # One account may queue again, for other SKUs, once sent away: judge each queueing apart.
    episodes: dict[tuple[str, frozenset[str]], list[RoomAnswer]] = defaultdict(list)
    for account, seen_all in answers.items():
        for a in seen_all:
            episodes[(account, frozenset(a.skus))].append(a)
    for (account, skus), seen in episodes.items():
        if not skus or not skus <= set(sold_at):
            # Not every SKU they wanted sold out: a "sold out" sent them away wrongly.
            if skus & not_sold and any(a.state == "sold_out" for a in seen):
                problems.append(f"{account} was told 'sold out' but {sorted(skus & not_sold)} had units left")
            continue
        sold_lo = max(sold_at[s][0] for s in skus)
        sold_hi = max(sold_at[s][1] for s in skus)
        problems += [
            f"{account} was told 'sold out' {1000 * (sold_lo - a.complete):.0f} ms before the last unit was paid"
            for a in seen
            if a.state == "sold_out" and a.complete < sold_lo
        ][:1]
        for a in seen:
            if a.invoke >= sold_hi + CLOCK_MARGIN_S and a.state in _WAITING:
                problems.append(
                    f"{account} asked {1000 * (a.invoke - sold_lo):.0f} ms after the sell-out and was told "
                    f"{a.state!r}"
                )
        before = [a for a in seen if a.invoke < sold_lo]
        if not before:
            joined_after += 1
            continue
        if before[-1].state not in _WAITING:
            continue  # admitted (or sent away) before the sell-out
        told = None
        for a in seen[len(before) :]:
            if a.state == "sold_out" or a.state in _ADMITTED:
                told = a
                break
        if told is not None and told.state in _ADMITTED:
            continue  # it had been admitted just before the sell-out
        if told is not None:
            delay = told.complete - sold_lo
            delays_ms.append(1000 * delay)
            if delay > within_s:
                problems.append(f"{account} was told {1000 * delay:.0f} ms after the sell-out")
            continue
        last = seen[-1]
        due = last.complete + (last.poll_after_s or 0.0)
        if due > sold_lo + within_s:
            problems.append(
                f"{account} was told to come back {1000 * (due - sold_lo):.0f} ms after the sell-out "
                "and heard nothing before"
            )
        else:
            unreached += 1  # the run ended (or the visit did) before its next poll
    figures = {
        "within_ms": round(1000 * within_s),
        "told_after_sell_out_ms": _percentiles(delays_ms),
        "not_reached": unreached,
        "joined_after_sell_out": joined_after,
    }
    if not sold_at:
        return Check(
            "room_told",
            False,
            None,
            "not judged: no SKU sold out (or its last payment is not in the history)",
        ), figures
    return (
        _check(
            "room_told",
            problems,
            f"{len(delays_ms)} waiting buyers told within {1000 * within_s:.0f} ms of the sell-out "
            f"(worst {max(delays_ms, default=0):.0f} ms){f'; {unreached} not reached before the run ended' if unreached else ''}",
        ),
        figures,
    )


def _record_figures(record: RoomRecord) -> dict[str, Any]:
    """What the record alone says: joins, admissions per second, waits, the queue's longest."""
    t0 = record.opens_at_ms
    buyers = list(record.buyers.values())
    waits = [b.admitted_ms - max(b.joined_ms, t0) for b in buyers if b.admitted_ms is not None]
    per_second = Counter((b.admitted_ms - t0) // 1000 for b in buyers if b.admitted_ms is not None)
    admitted = [b.admitted_ms for b in buyers if b.admitted_ms is not None]
    span_s = (max(admitted) - min(admitted)) / 1000 if len(admitted) > 1 else 0.0
    moves: list[tuple[float, int]] = []
    for b in buyers:
        if b.position is None:
            continue
        left = _resolved_ms(b)
        if left is None:
            continue  # sent away as sold out without polling since: when is not recorded
        moves += [(max(b.joined_ms, t0), 1), (left, -1)]
    waiting = longest = 0
    for _, step in sorted(moves):
        waiting += step
        longest = max(longest, waiting)
    return {
        "sale": record.sale,
        "seed": record.seed,
        "rate_per_s": record.rate_per_s,
        "oversubscribe": record.oversubscribe,
        "buyers": len(buyers),
        "pre_queue": len(record.pre_queue),
        **{k: record.counters.get(k, 0) for k in ("joined", "admitted", "used", "expired", "told_sold_out")},
        "queue_max": longest,
        "admitted_per_s": {
            "peak": max(per_second.values(), default=0),
            "mean": round(len(admitted) / span_s, 1) if span_s else None,
        },
        "wait_ms": _percentiles([float(w) for w in waits]),
        "told_after_room_saw_ms": _percentiles(
            [float(b.told_after_ms) for b in buyers if b.told_after_ms is not None]
        ),
    }


def room_checks(
    record: RoomRecord,
    operations: Iterable[Operation],
    *,
    stocked: Mapping[str, int],
    sold_out: Collection[str],
    told_within_s: float = 1.0,
    t0_epoch: float | None = None,
) -> tuple[list[Check], dict[str, Any]]:
    """The room's checks (``ROOM_CHECKS``) and its figures for the report. ``stocked``: units
    stocked per SKU (reserve pool included); ``sold_out``: the SKUs sold out at the end."""
    ops = list(operations)
    answers = room_answers(ops)
    sold_at = sell_outs(ops, sold_out)
    exact = {sku: ms / 1000 for sku, ms in (record.sold_out_at_ms or {}).items() if sku in sold_out}
    sold_at.update({sku: (t, t) for sku, t in exact.items()})
    tickets, skips = check_tickets(record, ops)
    told, told_figures = check_told(answers, sold_at, told_within_s, set(stocked) - set(sold_out))
    t0 = record.opens_at_ms / 1000 if t0_epoch is None else t0_epoch
    figures = {
        **_record_figures(record),
        **told_figures,
        "sold_out_at_s_from_t0": {sku: round(lo - t0, 3) for sku, (lo, _) in sorted(sold_at.items())},
        "sold_out_moment": "exact (the service's record)"
        if exact
        else "the last payment's request (history)",
        "skip_attempts": skips,
    }
    checks = [
        check_shuffle(record, answers),
        check_fifo(record),
        tickets,
        check_admission_bound(record, ops, stocked),
        told,
    ]
    return checks, figures
