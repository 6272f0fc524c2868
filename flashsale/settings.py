"""Service settings: one frozen dataclass, read from ``FLASHSALE_*`` environment variables
(and overridden by CLI flags). There is no module-level settings object: whoever starts
the service builds one and passes it to ``create_app``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Settings", "SettingsError", "ENV_DOC", "parse_env_value"]


class SettingsError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


#: Every setting: (environment variable, field, meaning). README's table is built from this.
ENV_DOC: tuple[tuple[str, str, str], ...] = (
    ("FLASHSALE_REDIS_URL", "redis_url", "Redis to use (default: start an embedded one where a command can)"),
    (
        "FLASHSALE_REDIS_CLUSTER",
        "redis_cluster",
        "1 when FLASHSALE_REDIS_URL names a node of a Redis Cluster",
    ),
    (
        "FLASHSALE_DATABASE_URL",
        "database_url",
        "PostgreSQL to use (default: start an embedded one where a command can)",
    ),
    ("FLASHSALE_HOST", "host", "address the service binds (default 127.0.0.1)"),
    ("FLASHSALE_PORT", "port", "port the service binds (default 8080)"),
    ("FLASHSALE_WORKERS", "workers", "service processes sharing the port (default 1)"),
    ("FLASHSALE_TOKEN_SECRET", "token_secret", "HMAC secret for buyer tokens (required to serve)"),
    (
        "FLASHSALE_ADMIN_TOKEN",
        "admin_token",
        "bearer token for /api/admin/* and /warroom (required to serve)",
    ),
    ("FLASHSALE_KEY_PREFIX", "key_prefix", "prefix of every Redis key (default fs)"),
    (
        "FLASHSALE_MAX_IN_FLIGHT",
        "max_in_flight",
        "order requests in progress per process before shedding with 503 (default 1000)",
    ),
    (
        "FLASHSALE_BUYER_IN_FLIGHT",
        "buyer_in_flight",
        "one buyer's requests in progress per process before 429 too_many_in_progress (default 8; 0: no cap)",
    ),
    ("FLASHSALE_USER_RATE", "user_rate", "order requests per second per buyer, per process (default 5)"),
    ("FLASHSALE_USER_BURST", "user_burst", "burst allowance of the per-buyer rate limit (default 10)"),
    ("FLASHSALE_MAX_BODY_BYTES", "max_body_bytes", "largest request body accepted (default 16384)"),
    (
        "FLASHSALE_READ_TIMEOUT",
        "read_timeout_s",
        "seconds a client has to send a request body before 408 request_timeout (default 5)",
    ),
    (
        "FLASHSALE_REDIS_TIMEOUT",
        "redis_timeout_s",
        "seconds before a Redis call's outcome is reported unknown (default 2)",
    ),
    (
        "FLASHSALE_SKU_CACHE",
        "sku_cache_s",
        "seconds a product-page answer is cached per process (default 0.25)",
    ),
    (
        "FLASHSALE_SOLD_OUT_CACHE",
        "sold_out_cache_s",
        "seconds a sold-out SKU is refused without asking Redis (default 0.5)",
    ),
    (
        "FLASHSALE_SALE_CACHE",
        "sale_cache_s",
        "seconds sale settings (opening time, switches) are cached (default 0.5)",
    ),
    ("FLASHSALE_LOG_LEVEL", "log_level", "INFO, DEBUG, WARNING… (default INFO)"),
    (
        "FLASHSALE_ACCESS_LOG",
        "access_log",
        "1 to log every request (off by default: the hot path stays quiet)",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    token_secret: str = ""
    admin_token: str = ""
    key_prefix: str = "fs"
    max_in_flight: int = 1000
    buyer_in_flight: int = 8
    user_rate: float = 5.0
    user_burst: int = 10
    max_body_bytes: int = 16384
    read_timeout_s: float = 5.0
    redis_timeout_s: float = 2.0
    sku_cache_s: float = 0.25
    sold_out_cache_s: float = 0.5
    sale_cache_s: float = 0.5
    log_level: str = "INFO"
    access_log: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``FLASHSALE_*`` variables; keyword overrides win (CLI flags)."""
        env = os.environ if env is None else env
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for var, name, _meaning in ENV_DOC:
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[name] = parse_env_value(var, raw, str(types[name]))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def require_secrets(self) -> None:
        missing = [
            var
            for var, name, _ in ENV_DOC
            if name in ("token_secret", "admin_token") and not getattr(self, name)
        ]
        if missing:
            raise SettingsError(
                f"{' and '.join(missing)} must be set to serve: buyer tokens are signed with the "
                "secret and operators authenticate with the admin token. "
                "For a local try-out: export FLASHSALE_TOKEN_SECRET=$(openssl rand -hex 16) "
                "FLASHSALE_ADMIN_TOKEN=$(openssl rand -hex 16)"
            )


def parse_env_value(var: str, raw: str, type_name: str) -> Any:
    """One environment value as the named type (bool, float, int, else str), or a
    SettingsError that names the variable."""
    try:
        if "bool" in type_name:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "float" in type_name:
            return float(raw)
        if "int" in type_name:
            return int(raw)
    except ValueError:
        raise SettingsError(f"{var}={raw!r} is not a valid {type_name.split()[0]}") from None
    return raw
