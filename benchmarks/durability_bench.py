"""What each Redis durability setting costs in reservations per second, and what a crash
loses with it — both measured in the same run, on the same machine.

    python -m benchmarks.durability_bench [--seconds 4] [--trials 3] [--concurrency 32] [--json FILE]

For each mode and trial: a fresh ``redis-server`` (the embedded runtime's), a SKU with
plenty of stock, ``--concurrency`` buyers each on its own connection reserving one unit at
a time through the inventory engine (``coalesce=False``, so every reservation is its own
write and, with ``WAIT``, its own wait). Partway through (40–80 % of ``--seconds``) the
primary is SIGKILLed. Every reservation acknowledged before the kill is recorded; after the
restart (or the failover) each one is looked up: the ones missing were **lost** although
the buyer was told they were held. Throughput is acknowledged reservations per second
before the kill.

Modes:

* ``aof-everysec`` — ``appendonly yes``, ``appendfsync everysec`` (the project default);
* ``aof-always`` — ``appendfsync always``: fsync before every reply;
* ``no-persistence`` — ``appendonly no`` and no RDB: the baseline that loses everything;
* ``replica-async`` — a replica follows the primary (AOF off on both); after the kill the
  replica is promoted: what a failover to an asynchronous replica loses;
* ``replica-wait`` — the same, but each reservation is followed by ``WAIT 1 1000`` on its
  connection and counted as acknowledged only once the replica has it (``WAIT`` exists on
  Redis ≥ 3; ``WAITAOF``, which waits for the local fsync, needs Redis ≥ 7.2 and is
  measured only when the server has it).

A SIGKILL kills the process, not the machine: the kernel still writes out what Redis had
handed to it, so ``everysec`` and ``always`` both lose nothing here. What ``always`` buys
over ``everysec`` is the last second on a **power loss or kernel crash**, which this bench
cannot cause; the table says so rather than guessing a number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flashsale.runtime.embedded import RedisServer
from inventory import Inventory, InventoryError

MODES = ("aof-everysec", "aof-always", "no-persistence", "replica-async", "replica-wait", "replica-waitaof")


@dataclass
class Trial:
    mode: str
    acknowledged: int
    seconds_before_kill: float
    lost: int
    unknown: int  # reservations in flight at the kill (their buyers were told nothing)

    @property
    def rate(self) -> float:
        return self.acknowledged / self.seconds_before_kill if self.seconds_before_kill else 0.0


@dataclass
class ModeResult:
    mode: str
    trials: list[Trial] = field(default_factory=list)
    skipped: str = ""

    def row(self) -> dict[str, Any]:
        rates = [t.rate for t in self.trials]
        return {
            "mode": self.mode,
            "skipped": self.skipped,
            "reservations_per_s": round(statistics.median(rates), 1) if rates else None,
            "acknowledged_before_kill": sum(t.acknowledged for t in self.trials),
            "lost_after_crash": sum(t.lost for t in self.trials),
            "worst_trial_lost": max((t.lost for t in self.trials), default=0),
            "trials": [asdict(t) | {"rate": round(t.rate, 1)} for t in self.trials],
        }


def _servers(mode: str, workdir: Path) -> tuple[RedisServer, RedisServer | None]:
    if mode.startswith("replica"):
        aof = mode == "replica-waitaof"  # WAITAOF counts only AOF fsyncs
        primary = RedisServer(appendonly=aof, data_dir=workdir / "primary").start()
        replica = RedisServer(
            appendonly=aof,
            data_dir=workdir / "replica",
            extra_args=("--replicaof", "127.0.0.1", str(primary.port)),
        ).start()
        return primary, replica
    aof = mode.startswith("aof")
    fsync = "always" if mode == "aof-always" else "everysec"
    return RedisServer(appendonly=aof, appendfsync=fsync, data_dir=workdir / "redis").start(), None  # type: ignore[arg-type]


async def _wait_replica_synced(replica: RedisServer, timeout: float = 15) -> None:
    client = Redis.from_url(replica.url, decode_responses=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await client.info("replication")
            if info.get("master_link_status") == "up":
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the replica did not sync with the primary")
    finally:
        await client.aclose()


async def _trial(mode: str, seconds: float, concurrency: int, rng: random.Random) -> Trial:
    workdir = Path(tempfile.mkdtemp(prefix="flashsale-durability-"))
    primary, replica = _servers(mode, workdir)
    try:
        if replica is not None:
            await _wait_replica_synced(replica)
        setup = Redis.from_url(primary.url)
        await Inventory(setup, "bench", coalesce=False).stock("sku", 10**9)
        if replica is not None:
            await setup.execute_command("WAIT", 1, 5000)  # type: ignore[no-untyped-call]
        await setup.aclose()
        acked: list[str] = []
        unknown = 0
        killed = asyncio.Event()
        wait_cmd = {"replica-wait": ("WAIT", 1, 1000), "replica-waitaof": ("WAITAOF", 1, 1, 1000)}.get(mode)

        async def buyer(n: int) -> None:
            nonlocal unknown
            client = Redis.from_url(primary.url, single_connection_client=True, socket_timeout=5, retry=None)
            inv = Inventory(client, "bench", coalesce=False)
            i = 0
            try:
                while not killed.is_set():
                    i += 1
                    try:
                        hold = await inv.reserve(f"u{n}", "sku", request_id=f"r{n}-{i}")
                        if wait_cmd is not None:
                            replicas = await client.execute_command(*wait_cmd)  # type: ignore[no-untyped-call]
                            confirmed = min(replicas) if isinstance(replicas, list) else replicas
                            if int(confirmed) < 1:
                                unknown += 1  # not confirmed: the service must not acknowledge it
                                continue
                    except (RedisError, InventoryError, OSError):
                        if killed.is_set():
                            unknown += 1
                            return
                        raise
                    if killed.is_set():
                        unknown += 1  # answered after the kill began: counted as not told
                        return
                    acked.append(hold.hold_id)
            finally:
                await client.aclose()

        started = time.monotonic()
        tasks = [asyncio.ensure_future(buyer(n)) for n in range(concurrency)]
        await asyncio.sleep(seconds * rng.uniform(0.4, 0.8))
        killed.set()
        before_kill = time.monotonic() - started
        acked_at_kill = list(acked)
        await asyncio.to_thread(primary.kill)
        await asyncio.gather(*tasks, return_exceptions=True)
        if replica is not None:
            survivor = Redis.from_url(replica.url, decode_responses=True)
            await survivor.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
        else:
            await asyncio.to_thread(primary.start)
            survivor = Redis.from_url(primary.url, decode_responses=True)
        try:
            present = 0
            for i in range(0, len(acked_at_kill), 1000):
                chunk = acked_at_kill[i : i + 1000]
                found = await survivor.hmget("{fs:bench}:holds", chunk)
                present += sum(1 for f in found if f is not None)
        finally:
            await survivor.aclose()
        return Trial(mode, len(acked_at_kill), before_kill, len(acked_at_kill) - present, unknown)
    finally:
        for server in (replica, primary):
            if server is not None:
                server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _machine(sample_dir: Path) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(sample_dir)], capture_output=True, text=True
    ).stdout.strip()
    server = RedisServer()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": str(server.engine),  # e.g. "Valkey 9.1.2"
        "data_dir_filesystem": fs or "unknown",
    }


def table(results: list[ModeResult]) -> str:
    base = next((r.row()["reservations_per_s"] for r in results if r.mode == "aof-everysec"), None)
    head = ("mode", "reservations/s", "vs everysec", "acknowledged", "lost after SIGKILL", "worst trial")
    rows: list[tuple[str, ...]] = [head]
    for r in results:
        row = r.row()
        if r.skipped:
            rows.append((r.mode, "-", "-", "-", "skipped", "-"))
            continue
        rate = row["reservations_per_s"]
        rel = f"{rate / base:.2f}x" if base and rate is not None else "-"
        rows.append(
            (
                r.mode,
                f"{rate:.0f}",
                rel,
                str(row["acknowledged_before_kill"]),
                str(row["lost_after_crash"]),
                str(row["worst_trial_lost"]),
            )
        )
    widths = [max(len(str(x[i])) for x in rows) for i in range(len(head))]
    notes = [f"{r.mode}: skipped, {r.skipped}" for r in results if r.skipped]
    lines = [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(x, widths)))
        for x in rows
    ]
    return "\n".join(lines + notes)


async def run(seconds: float, trials: int, concurrency: int, modes: list[str], seed: int) -> list[ModeResult]:
    rng = random.Random(seed)
    engine = RedisServer().engine
    # Trials interleave the modes (everysec, always, …, everysec, always, …) so a burst of
    # load from a neighbour on a shared machine does not land on one mode only.
    by_mode = {m: ModeResult(m) for m in modes}
    if "replica-waitaof" in by_mode and engine.redis_version < (7, 2):
        by_mode["replica-waitaof"].skipped = f"WAITAOF needs Redis >= 7.2 (or Valkey), this is {engine}"
    for _ in range(trials):
        for mode, result in by_mode.items():
            if result.skipped:
                continue
            result.trials.append(await _trial(mode, seconds, concurrency, rng))
    return list(by_mode.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.durability_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="load per trial before and around the kill (default 4)"
    )
    parser.add_argument("--trials", type=int, default=3, help="trials per mode (default 3)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="buyers, one connection each (default 32)"
    )
    parser.add_argument("--mode", action="append", choices=MODES, help="only these modes (repeatable)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    modes = args.mode or list(MODES)
    machine = _machine(Path(tempfile.gettempdir()))
    started = time.time()
    results = asyncio.run(run(args.seconds, args.trials, args.concurrency, modes, args.seed))
    print(
        f"durability bench: {args.trials} trial(s) x {args.seconds:.0f} s per mode, {args.concurrency} buyers; "
        f"{machine['cpu']}, {machine['cores']} cores, load {machine['load_average']}, {machine['redis']}, "
        f"data dir on {machine['data_dir_filesystem']}"
    )
    print(table(results))
    print(
        "lost = acknowledged reservations missing after SIGKILL and restart (or failover to the replica).\n"
        "A SIGKILL leaves the kernel's page cache intact: what appendfsync always adds over everysec is the\n"
        "last second on a power loss or kernel crash, which this bench does not cause."
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "started_at": started,
                    "settings": vars(args) | {"json": str(args.json)},
                    "results": [r.row() for r in results],
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
