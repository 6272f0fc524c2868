"""The worker's settings: the order writer's and the hold sweeper's knobs, read from
``FLASHSALE_*`` variables (:data:`WORKER_ENV_DOC` names each one) and CLI flags, checked
once, then frozen."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flashsale.settings import Settings, SettingsError
from flashsale.settings import parse_env_value as parse_setting

__all__ = ["WORKER_ENV_DOC", "WorkerSettings"]


#: The worker's own settings: (environment variable, field, meaning). The shared ones
#: (FLASHSALE_REDIS_URL, FLASHSALE_REDIS_CLUSTER, FLASHSALE_DATABASE_URL,
#: FLASHSALE_KEY_PREFIX) come from :class:`flashsale.settings.Settings`.
WORKER_ENV_DOC: tuple[tuple[str, str, str], ...] = (
    (
        "FLASHSALE_WORKER_CONSUMER",
        "consumer",
        "consumer name in the writers' group (default: host name); one per worker",
    ),
    (
        "FLASHSALE_WORKER_BATCH",
        "batch",
        "changes read at once and written per PostgreSQL transaction, about (whole entries: "
        "a reservation call's entry is one change per hold) (default 1000)",
    ),
    (
        "FLASHSALE_WORKER_BLOCK_MS",
        "block_ms",
        "how long an idle worker waits for new entries per read (default 100)",
    ),
    (
        "FLASHSALE_WORKER_LINGER_MS",
        "linger_ms",
        "after a short read, wait this long for more entries to fill the batch (default 2)",
    ),
    (
        "FLASHSALE_WORKER_CLAIM_IDLE_MS",
        "claim_idle_ms",
        "take over entries another worker left unacknowledged this long (default 60000)",
    ),
    (
        "FLASHSALE_WORKER_CLAIM_INTERVAL_S",
        "claim_interval_s",
        "how often to look for such entries (default 5)",
    ),
    (
        "FLASHSALE_WORKER_MAX_DELIVERIES",
        "max_deliveries",
        "deliveries without a commit before an entry is dead-lettered (default 10)",
    ),
    (
        "FLASHSALE_WORKER_MAX_ATTEMPTS",
        "max_attempts",
        "failed writes of a change on its own before its entry is dead-lettered (default 3)",
    ),
    (
        "FLASHSALE_WORKER_TRIM_INTERVAL_S",
        "trim_interval_s",
        "how often to trim committed entries off the streams; 0 = never (default 5)",
    ),
    ("FLASHSALE_WORKER_SALES_REFRESH_S", "sales_refresh_s", "how often to look for new sales (default 2)"),
    (
        "FLASHSALE_WORKER_WRITE_METHOD",
        "write_method",
        "unnest (one statement per batch, default) or copy (COPY into temp tables)",
    ),
    (
        "FLASHSALE_WORKER_STATEMENT_TIMEOUT_MS",
        "statement_timeout_ms",
        "PostgreSQL statement timeout for the worker (default 30000)",
    ),
    ("FLASHSALE_WORKER_POOL_SIZE", "pool_size", "PostgreSQL connections per worker (default 4)"),
    (
        "FLASHSALE_WORKER_STOP_GRACE_S",
        "stop_grace_s",
        "after SIGTERM, finish or keep retrying the batch in hand this long; "
        "the process exits within this + 5 s (default 10)",
    ),
    (
        "FLASHSALE_WORKER_PROGRESS_INTERVAL_S",
        "progress_interval_s",
        "one progress log line this often (default 10)",
    ),
    ("FLASHSALE_SWEEPER_INTERVAL_MS", "sweep_interval_ms", "pause between hold-expiry sweeps (default 200)"),
    ("FLASHSALE_SWEEPER_LIMIT", "sweep_limit", "holds expired per script call, 1..1000 (default 500)"),
)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The order writer's and sweeper's settings; :meth:`from_env` reads ``FLASHSALE_*``."""

    redis_url: str
    database_url: str = ""  # the order writer needs it; the sweeper alone does not
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster
    prefix: str = "fs"
    #: Consumer name in the group. Stable across restarts (so a restarted worker finds its
    #: own pending entries); give each worker on one host its own.
    consumer: str = field(default_factory=socket.gethostname)
    batch: int = 1000
    block_ms: int = 100
    linger_ms: int = 2
    claim_idle_ms: int = 60_000
    claim_interval_s: float = 5.0
    max_deliveries: int = 10
    max_attempts: int = 3
    trim_interval_s: float = 5.0
    sales_refresh_s: float = 2.0
    write_method: str = "unnest"
    statement_timeout_ms: int = 30_000
    pool_size: int = 4
    stop_grace_s: float = 10.0
    progress_interval_s: float = 10.0
    sweep_interval_ms: int = 200
    sweep_limit: int = 500

    def __post_init__(self) -> None:
        problems = []
        if not self.redis_url:
            problems.append(
                "FLASHSALE_REDIS_URL must name the service's Redis, e.g. redis://127.0.0.1:6379/0"
            )
        if not 1 <= self.batch <= 100_000:
            problems.append("FLASHSALE_WORKER_BATCH must be 1..100000")
        if self.write_method not in ("unnest", "copy"):
            problems.append("FLASHSALE_WORKER_WRITE_METHOD must be 'unnest' or 'copy'")
        if not 1 <= self.sweep_limit <= 1000:
            problems.append("FLASHSALE_SWEEPER_LIMIT must be 1..1000 (the expire script's bound)")
        if (
            min(
                self.max_deliveries,
                self.max_attempts,
                self.block_ms,
                self.claim_idle_ms,
                self.statement_timeout_ms,
                self.pool_size,
                self.sweep_interval_ms,
            )
            < 1
        ):
            problems.append("counts, sizes and times in ms must be at least 1")
        if (
            min(
                self.linger_ms,
                self.claim_interval_s,
                self.trim_interval_s,
                self.sales_refresh_s,
                self.stop_grace_s,
                self.progress_interval_s,
            )
            < 0
        ):
            problems.append("intervals must not be negative")
        if problems:
            raise SettingsError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from ``FLASHSALE_*`` variables; ``overrides`` (CLI flags) win."""
        env = os.environ if environ is None else environ
        shared = Settings.from_env(env)
        values: dict[str, Any] = {
            "redis_url": shared.redis_url,
            "redis_cluster": shared.redis_cluster,
            "database_url": shared.database_url or "",
            "prefix": shared.key_prefix,
        }
        types = {f.name: str(f.type) for f in fields(cls)}
        for var, name, _meaning in WORKER_ENV_DOC:
            raw = env.get(var, "").strip()
            if raw:
                values[name] = parse_setting(var, raw, types[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
