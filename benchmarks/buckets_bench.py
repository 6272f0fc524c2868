"""Hot-SKU buckets on a local Redis Cluster: reservations/s of ONE hot SKU split into
1, 2, 4 … buckets, measured in the same run (ratios against 1 bucket).

    python -m benchmarks.buckets_bench [--seconds 5] [--callers 256] [--buckets 1,2,4]

Each run starts an embedded 3-master cluster (benchmarks only: the cluster, the load
generator and this process share the machine's cores). The generator's CPU share is
printed beside every figure: when it is near 100 % of a core, the figure describes the
generator, not Redis — which is what 2 cores show; the ratio across bucket counts is
still the point: on more cores and shards, buckets are how one SKU gets past one shard.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import time
from typing import Any

from redis.asyncio.cluster import RedisCluster

from flashsale.runtime.cluster import RedisClusterServer
from inventory import BucketedInventory, Hold, SoldOut


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


async def one_run(url: str, buckets: int, seconds: float, callers: int) -> dict[str, Any]:
    client = RedisCluster.from_url(url, max_connections=4 * callers)
    sale = f"bench{buckets}x{int(time.time() * 1000) % 100000}"
    inv = BucketedInventory(client, sale, buckets)
    await inv.stock("hot", 10_000_000)
    nodes = sorted({client.get_node_from_key(b.keys.stock).name for b in inv.buckets})
    deadline = time.monotonic() + seconds
    counts = {"held": 0, "refused": 0}

    async def caller(c: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            try:
                result = await inv.reserve(f"c{c}n{n}", "hot", request_id=f"c{c}n{n}")
            except SoldOut:
                counts["refused"] += 1
                continue
            assert isinstance(result, Hold)
            counts["held"] += 1

    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    wall = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    snap = await inv.snapshot("hot")
    await inv.aclose()
    await client.aclose()
    assert snap is not None and snap.balanced and snap.held == counts["held"]
    return {
        "buckets": buckets,
        "shards_used": len(nodes),
        "reservations_per_s": round(counts["held"] / wall),
        "generator_cpu_share": round(cpu / wall, 2),
        "generator_bound": cpu / wall > 0.9,
    }


async def main_async(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    rows = []
    for b in args.buckets:
        rows.append(await one_run(url, b, args.seconds, args.callers))
    base = rows[0]["reservations_per_s"] or 1
    for row in rows:
        row["ratio_vs_1_bucket"] = round(row["reservations_per_s"] / base, 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per bucket count (default 5)")
    parser.add_argument("--callers", type=int, default=256, help="concurrent callers (default 256)")
    parser.add_argument(
        "--buckets",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4],
        help="bucket counts to compare (default 1,2,4)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with RedisClusterServer(masters=3) as cluster:
        rows = asyncio.run(main_async(args, cluster.url))
    info = machine()
    print(f"hot-SKU buckets on an embedded 3-master Redis Cluster — {info['cpu']}, {info['cores']} cores")
    print(f"{'buckets':>7} {'shards':>6} {'reservations/s':>15} {'ratio':>6} {'generator CPU':>14}")
    for r in rows:
        mark = "  (generator-bound)" if r["generator_bound"] else ""
        print(
            f"{r['buckets']:>7} {r['shards_used']:>6} {r['reservations_per_s']:>15,} "
            f"{r['ratio_vs_1_bucket']:>6} {r['generator_cpu_share']:>13.0%}{mark}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
