"""flashsale's drill: a locustfile written with the kit's public API, like yours would be.

    FLASHSALE_ADMIN_TOKEN=… locust -f "$(python -m loadtests path)" --headless --host http://127.0.0.1:8080
    locust -f loadtests/surge.py --master …   +   locust -f loadtests/surge.py --worker --master-host …

``python -m loadtests help`` lists every option (the kit's ``--shape``, ``--peak-rps``,
``--time-scale``, ``--personas``, ``--slo`` … and the drill's own below).

What it declares (``loadtests.rehearsal``):

- **setup** (the master): create the drill's sale opening at T0 (``loadtests.drill``) — or
  drive ``--sale`` — behind flashsale's waiting room with ``--waiting-room``, register the
  war room's target curve, schedule the hot SKU's reserve release mid-surge, and watch the
  hot SKU on the live line;
- **process setup** (every Locust process): mint its buyers' and bots' tokens;
- **personas**: browsers, buyers, abandoners, bots and retry storms (``loadtests.personas``);
- **sampler**: ``GET /api/admin/stats`` once a second (stock per SKU, the stream's backlog,
  the writer's progress) for the live line and the stock and queue plots;
- **oracle**: wait for unpaid holds to lapse, then ``POST /api/admin/audit`` with every
  acknowledged order (``loadtests.oracle``); behind the waiting room, the room's checks from
  its record, which is kept in the report folder (``waiting-room.json``).

Locust's own statistics still work (every request fires Locust's request event); an
expected "sold out" or "limit reached" is marked a success there too.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from typing import Any

from locust import events

from loadtests import (
    OracleContext,
    ProcessContext,
    Rehearsal,
    RunContext,
    ServiceSample,
    SetupContext,
    SetupError,
    Truth,
)
from loadtests.admin import AdminClient, AdminError, StatsReader, admin_token_from_env, parse_stats
from loadtests.drill import DrillSale, default_sale, expected_orders, sale_from_settings
from loadtests.oracle import ORDER_OPERATIONS, judge_waiting_room, run_oracle
from loadtests.personas import (
    DEFAULT_WEIGHTS,
    KINDS,
    VISITS,
    Behaviour,
    Catalogue,
    CatalogueItem,
    RoomVisits,
    Shop,
)

rehearsal = Rehearsal("flashsale", order_operations=ORDER_OPERATIONS)
for _name, _visit in VISITS.items():
    rehearsal.persona(_visit, name=_name, weight=DEFAULT_WEIGHTS[_name], kinds=KINDS[_name])


def _drill_options(parser: Any, **_kw: Any) -> None:
    add = parser.add_argument
    add(
        "--admin-token",
        default=admin_token_from_env(),
        is_secret=True,
        help="the service's admin token (default: $FLASHSALE_ADMIN_TOKEN)",
    )
    add(
        "--sale",
        default="",
        env_var="FLASHSALE_DRILL_SALE",
        help="drive this existing sale instead of creating the drill's own",
    )
    add(
        "--hold-ttl",
        type=float,
        default=-1.0,
        help="hold TTL of the drill's sale in seconds (default 10 × time scale)",
    )
    add("--buyer-users", type=int, default=2000, help="distinct buyer accounts")
    add("--bot-users", type=int, default=20, help="distinct bot accounts")
    add(
        "--impatient-timeout",
        type=float,
        default=0.25,
        help="retry-storm clients' timeout in seconds (they retry what they did not hear back about)",
    )
    add("--audit-wait", type=float, default=60.0, help="seconds the audit may wait for the queue to drain")
    add(
        "--waiting-room",
        action="store_true",
        default=False,
        help="put the sale behind flashsale's waiting room: buyers join and poll it, bots try to skip it, "
        "and the oracle checks the room (docs/waiting-room.md)",
    )
    add("--room-rate", type=float, default=50.0, help="waiting room: buyers admitted per second (default 50)")
    add(
        "--room-oversubscribe",
        type=float,
        default=1.0,
        help="waiting room: admit up to this many buyers per unit available (default 1)",
    )
    add(
        "--room-told-within",
        type=float,
        default=1.0,
        help="waiting room: seconds within which every waiting buyer of a sold-out SKU must hear it (default 1)",
    )


events.init_command_line_parser.add_listener(_drill_options)  # type: ignore[no-untyped-call]


def _admin(ctx: RunContext) -> AdminClient:
    return AdminClient(ctx.host, ctx.options.admin_token)


def _behaviour(options: Any) -> Behaviour:
    return Behaviour(buyer_users=options.buyer_users, bot_users=options.bot_users)


@rehearsal.setup
def create_sale(ctx: SetupContext) -> dict[str, Any]:
    opt = ctx.options
    if not opt.admin_token:
        raise SetupError(
            "no admin token: set FLASHSALE_ADMIN_TOKEN or pass --admin-token (the drill mints "
            "buyer tokens, creates its sale and asks for the audit with it)"
        )
    admin = _admin(ctx)
    behaviour = _behaviour(opt)
    room = (
        {"rate_per_s": opt.room_rate, "oversubscribe": opt.room_oversubscribe} if opt.waiting_room else None
    )
    try:
        if opt.sale:
            sale = sale_from_settings(admin.sale(opt.sale))
            if room is not None:
                admin.switch_room(sale.name, **room)
        else:
            sale = default_sale(
                ctx.shape,
                ctx.run_id,
                weights=ctx.weights,
                behaviour=behaviour,
                start_epoch=ctx.start_epoch,
                hold_ttl_s=opt.hold_ttl if opt.hold_ttl > 0 else None,
                waiting_room=room,
            )
            admin.create_sale(sale.spec)
    except (AdminError, ValueError) as exc:
        raise SetupError(f"cannot set up the drill's sale: {exc}") from None
    _register_target(ctx, admin, sale, behaviour)
    if sale.release_reserve_at_s is not None:
        ctx.at(sale.release_reserve_at_s, lambda: _release_reserve(admin, sale, ctx.run_id))
    ctx.watch(sale.catalogue.hot)
    ctx.note("sale", sale.name)
    if room is not None:
        ctx.note("waiting_room", room)
    if command := os.environ.get("FLASHSALE_DRILL_COMMAND"):  # `flashsale rehearse` passes its own
        ctx.note("command", command)
    return {
        "sale": sale.name,
        "catalogue": {"items": [asdict(i) for i in sale.catalogue.items], "hot": sale.catalogue.hot},
        "waiting_room": room is not None,
    }


def _register_target(ctx: SetupContext, admin: AdminClient, sale: DrillSale, behaviour: Behaviour) -> None:
    """The war room draws orders against this: the shape's cumulative arrivals scaled to the
    order requests they should bring, once a second. Optional: a service without a war room
    still runs the drill."""
    shape = ctx.shape
    per_arrival = expected_orders(shape, ctx.weights, behaviour) / max(shape.total, 1.0)
    seconds = int(math.ceil(shape.duration_s))
    points = [[t * 1000, round(shape.cumulative(float(t)) * per_arrival, 1)] for t in range(seconds + 1)]
    opt = ctx.options
    try:
        admin.register_target(
            f"{shape.name} {opt.peak_rps:g} arrivals/s", sale.name, int(ctx.start_epoch * 1000), points
        )
    except AdminError:
        pass


def _release_reserve(admin: AdminClient, sale: DrillSale, run_id: str) -> str:
    admin.release_reserve(sale.name, sale.catalogue.hot)
    return f"reserve of {sale.catalogue.hot.removesuffix(f'-{run_id}')} released"


@rehearsal.process_setup
def mint_tokens(ctx: ProcessContext) -> Shop:
    behaviour = _behaviour(ctx.options)
    admin = _admin(ctx)
    tokens: dict[str, str] = {}
    try:
        for kind, count in (("buyer", behaviour.buyer_users), ("bot", behaviour.bot_users)):
            # Users are named after the run, so per-user limits start afresh every drill.
            prefix = f"{ctx.run_id}-{kind}-"
            minted = admin.mint_tokens(prefix, count, ttl_s=int(ctx.shape.duration_s + 3600))
            tokens.update({f"{kind}-{i}": minted[f"{prefix}{i}"] for i in range(count)})
    except AdminError as exc:
        raise SetupError(f"cannot mint buyer tokens: {exc}") from None
    catalogue = ctx.shared["catalogue"]
    return Shop(
        Catalogue(tuple(CatalogueItem(**i) for i in catalogue["items"]), catalogue["hot"]),
        tokens,
        behaviour,
        impatient_timeout_s=ctx.options.impatient_timeout,
        # The service's accounts are the minted names: "<run id>-buyer-7".
        room=RoomVisits(ctx.shared["sale"], f"{ctx.run_id}-") if ctx.shared.get("waiting_room") else None,
    )


#: The sampler's kept-alive connection, per service and token (it polls once a second).
_stats_readers: dict[tuple[str, str], StatsReader] = {}


@rehearsal.sampler
def stats(ctx: RunContext) -> ServiceSample:
    key = (ctx.host, ctx.options.admin_token)
    reader = _stats_readers.get(key) or _stats_readers.setdefault(key, StatsReader(*key))
    return parse_stats(reader.stats(), time.time(), sale=ctx.shared.get("sale"))


@rehearsal.oracle
def audit(ctx: OracleContext) -> Truth:
    admin = _admin(ctx)
    truth = run_oracle(
        admin,
        ctx.history_paths,
        wait_s=ctx.options.audit_wait,
        sleep=ctx.sleep,
        progress=ctx.progress,
        sale=ctx.shared.get("sale"),
    )
    if not ctx.shared.get("waiting_room"):
        return truth
    ctx.progress("checking the waiting room against its record")
    return judge_waiting_room(
        truth,
        admin,
        ctx.shared["sale"],
        ctx.operations(),
        told_within_s=ctx.options.room_told_within,
        record_path=ctx.report_dir / "waiting-room.json",
        t0_epoch=ctx.t0_epoch,
    )


ArrivalDriver, ArrivalShape = rehearsal.locust_classes()
