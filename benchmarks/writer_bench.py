"""The order writer against raw asyncpg COPY into the same tables, measured in the same run,
and the time it takes to drain a backlog of orders.

    python -m benchmarks.writer_bench [--orders 100000] [--batch 1000] [--quick] [--json FILE]

A backlog of ``--orders`` holds (a quarter of the carts with two lines) is put on a sale's
stream before the clock starts, as the inventory engine writes them: ``reserved_batch``
entries of 64 holds each, one per reservation call at the engine's default batch
(``inventory/_events.py``). Then:

* raw COPY: ``copy_records_to_table`` of exactly the rows the writer produces (orders and
  their lines) into the empty tables — the ceiling: no parsing, no conflict handling, no
  Redis;
* the writer, once per write method (``unnest``: one INSERT … SELECT FROM unnest … ON
  CONFLICT statement per batch; ``copy``: COPY into temp tables, then INSERT … ON
  CONFLICT), draining the whole backlog: read, parse, write, XACK. The clock stops when
  the last entry is acknowledged.

Everything is repeated ``--rounds`` times in rotating order; each writer figure is divided by
the COPY figure of its own round, and the medians are shown with every round's ratio, so
drift from the neighbours on a shared machine shows instead of hiding.
Servers: FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL, else embedded ones started here.
Nothing is flushed: the run uses its own key prefix and PostgreSQL schema, removed after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from flashsale.pgpool import close_pool, create_pool
from flashsale.pipeline.migrate import migrate
from flashsale.pipeline.worker_settings import WorkerSettings
from flashsale.pipeline.writer import OrderWriter
from flashsale.runtime.embedded import EmbeddedStack
from flashsale.streams import ensure_group, events_key

from .machine import describe_machine, engine_label
from .servers import open_servers

SALE = "bench"


@dataclass
class Result:
    what: str
    orders: int
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def orders_per_s(self) -> float:
        return self.orders / self.seconds


def _entries(n: int, now_ms: int) -> list[dict[Any, Any]]:
    out: list[dict[Any, Any]] = []
    for i in range(n):
        lines = "phone:1,case:2" if i % 4 == 0 else "phone:1"
        out.append(
            {
                "type": "reserved",
                "order": f"{SALE}.{secrets.token_hex(12)}",
                "user": f"u{i % 50_000}",
                "lines": lines,
                "request": f"r-{i}",
                "deadline": str(now_ms + 1_800_000),
                "at": str(now_ms),
            }
        )
    return out


#: Holds per entry: a reservation call's at the engine's default ``max_batch``.
HOLDS_PER_ENTRY = 64


def _batch_entries(holds: list[dict[Any, Any]]) -> list[dict[Any, Any]]:
    """The holds as reserve.lua appends them: one ``reserved_batch`` entry per call, one
    field per hold (its id -> "<user> <lines> <request> <deadline>")."""
    out: list[dict[Any, Any]] = []
    for start in range(0, len(holds), HOLDS_PER_ENTRY):
        call = holds[start : start + HOLDS_PER_ENTRY]
        entry = {"type": "reserved_batch", "at": call[0]["at"]}
        for h in call:
            entry[h["order"]] = f"{h['user']} {h['lines']} {h['request']} {h['deadline']}"
        out.append(entry)
    return out


def _copy_rows(entries: list[dict[Any, Any]]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    orders, lines = [], []
    for e in entries:
        at = datetime.fromtimestamp(int(e["at"]) / 1000, UTC)
        pay_by = datetime.fromtimestamp(int(e["deadline"]) / 1000, UTC)
        orders.append((e["order"], SALE, e["user"], e["request"], "held", 0, at, pay_by, at, "0-0"))
        for part in e["lines"].split(","):
            sku, _, qty = part.partition(":")
            lines.append((e["order"], sku, int(qty)))
    return orders, lines


async def _truncate(pool: asyncpg.Pool) -> None:
    await pool.execute("TRUNCATE orders, order_lines, stock_events")


async def _raw_copy(
    pool: asyncpg.Pool, orders: list[tuple[Any, ...]], lines: list[tuple[Any, ...]]
) -> Result:
    await _truncate(pool)
    started = time.perf_counter()
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "orders",
                records=orders,
                columns=[
                    "order_id",
                    "sale",
                    "user_id",
                    "request_id",
                    "status",
                    "status_rank",
                    "created_at",
                    "pay_by",
                    "status_at",
                    "last_stream_id",
                ],
            )
            await conn.copy_records_to_table("order_lines", records=lines, columns=["order_id", "sku", "qty"])
    seconds = time.perf_counter() - started
    return Result("raw asyncpg COPY (orders + lines)", len(orders), len(orders) + len(lines), seconds)


async def _drain(redis: Any, pool: asyncpg.Pool, settings: WorkerSettings, n: int, n_entries: int) -> Result:
    await _truncate(pool)
    key = events_key(settings.prefix, SALE)
    await redis.xgroup_setid(key, "writers", "0")  # the whole backlog is undelivered again
    writer = OrderWriter(redis, pool, settings)
    started = time.perf_counter()
    task = asyncio.ensure_future(writer.run())
    while writer.stats.entries_committed < n_entries:
        if task.done():
            task.result()
            raise RuntimeError("the writer stopped before draining the backlog")
        await asyncio.sleep(0.002)
    seconds = time.perf_counter() - started
    writer.stop()
    await task
    rows = await pool.fetchval("SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM order_lines)")
    if writer.stats.dead_letters or await pool.fetchval("SELECT count(*) FROM orders") != n:
        raise RuntimeError(f"the writer did not write every order ({writer.stats})")
    return Result(f"writer drain, {settings.write_method}", n, int(rows), seconds)


async def run(args: argparse.Namespace, stack: EmbeddedStack) -> dict[str, Any]:
    from redis.asyncio import Redis

    servers = open_servers(stack)
    prefix = f"bench_{servers.token}"
    schema = f"bench_{servers.token}"
    admin = await asyncpg.connect(servers.database_url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    url = servers.database_url + ("&" if "?" in servers.database_url else "?") + f"search_path={schema}"
    redis = Redis.from_url(servers.redis_url, decode_responses=True)
    pool = await create_pool(url, max_size=4, statement_timeout_ms=600_000)
    key = events_key(prefix, SALE)
    try:
        machine = await describe_machine(servers, event_loop="asyncio")
        async with pool.acquire() as conn:
            await migrate(conn)
        entries = _entries(args.orders, int(time.time() * 1000))
        await ensure_group(redis, key)
        stream = _batch_entries(entries)
        for start in range(0, len(stream), 100):
            async with redis.pipeline(transaction=False) as pipe:
                for e in stream[start : start + 100]:
                    pipe.xadd(key, e)
                await pipe.execute()
        await redis.sadd(f"{prefix}:sales", SALE)
        orders, lines = _copy_rows(entries)

        rounds: list[list[Result]] = []
        for n in range(args.rounds):
            # Rotate the order each round so no contender always runs first (or last).
            contenders = ["copy-raw", *args.methods]
            contenders = contenders[n % len(contenders) :] + contenders[: n % len(contenders)]
            done: list[Result] = []
            for name in contenders:
                if name == "copy-raw":
                    done.append(await _raw_copy(pool, orders, lines))
                    continue
                settings = WorkerSettings(
                    redis_url=servers.redis_url,
                    database_url=url,
                    prefix=prefix,
                    consumer="bench",
                    batch=args.batch,
                    write_method=name,
                    trim_interval_s=0,
                    claim_interval_s=0,
                    progress_interval_s=0,
                    block_ms=5,
                )
                done.append(await _drain(redis, pool, settings, args.orders, len(stream)))
            rounds.append(sorted(done, key=lambda r: (not r.what.startswith("raw"), r.what)))
    finally:
        await close_pool(pool)
        await redis.delete(key, f"{{{prefix}:{SALE}}}:dead", f"{prefix}:sales", f"{prefix}:writer:stats")
        await redis.aclose()
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
    return {"machine": machine, "orders": args.orders, "batch": args.batch, "rounds": rounds}


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    rounds: list[list[Result]] = report["rounds"]
    pg = m.get("postgresql", {})
    out = [
        f"order writer vs raw COPY — {report['orders']:,} orders ({rounds[0][0].rows:,} rows: orders + lines), "
        f"batch {report['batch']}, {len(rounds)} rounds",
        f"machine: {m['cpu_model']}, {m['cores']} cores, load average at start {m['load_average_at_start']}; "
        f"PostgreSQL {pg.get('version')} (fsync {pg.get('fsync')}, synchronous_commit "
        f"{pg.get('synchronous_commit')}), {engine_label(m)}",
        "",
        f"{'what':<34} {'time s':>7} {'orders/s':>9} {'rows/s':>9} {'vs COPY':>8}   {'vs COPY by round':<24}",
    ]
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        ratios = [r[i].rows_per_s / r[0].rows_per_s for r in rounds]  # against COPY of the same round
        mid = median(same, key=lambda r: r.seconds)
        out.append(
            f"{first.what:<34} {mid.seconds:>7.2f} {mid.orders_per_s:>9,.0f} {mid.rows_per_s:>9,.0f} "
            f"{statistics.median(ratios):>7.2f}x   {' '.join(f'{x:.2f}' for x in ratios):<24}"
        )
    drains = [median([r[i] for r in rounds], key=lambda r: r.seconds) for i in range(1, len(rounds[0]))]
    best = min(drains, key=lambda r: r.seconds)
    out += [
        "",
        f"draining a backlog of {report['orders']:,} orders took {best.seconds:.2f} s ({best.what}, median of "
        f"{len(rounds)} rounds)",
        "Rows: medians over rounds; vs COPY: median of each round's rows/s over that round's raw COPY rows/s.",
    ]
    return "\n".join(out)


def median(results: list[Result], *, key: Any) -> Result:
    return sorted(results, key=key)[len(results) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=100_000, help="orders in the backlog (default 100000)")
    parser.add_argument("--batch", type=int, default=1000, help="the writer's batch size (default 1000)")
    parser.add_argument(
        "--methods",
        type=lambda s: s.split(","),
        default=["unnest", "copy"],
        help="write methods to compare (default unnest,copy)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="repeat everything this often; medians are shown (default 3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="10,000 orders, 1 round: a smoke run, same code paths"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.orders, args.rounds = 10_000, 1
    with EmbeddedStack() as stack:
        report = asyncio.run(run(args, stack))
    print(render(report))
    if args.json:
        doc = {
            **report,
            "rounds": [
                [
                    {
                        "what": r.what,
                        "orders": r.orders,
                        "rows": r.rows,
                        "seconds": round(r.seconds, 3),
                        "orders_per_s": round(r.orders_per_s),
                        "rows_per_s": round(r.rows_per_s),
                    }
                    for r in one
                ]
                for one in report["rounds"]
            ],
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
