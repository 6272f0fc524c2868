"""Service settings: one frozen dataclass, read from ``FLASHSALE_*`` environment variables
(and overridden by CLI flags). There is no module-level settings object: whoever starts
the service builds one and passes it to ``create_app``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flashsale.console import redact

__all__ = [
    "ENV_DOC",
    "Settings",
    "SettingsError",
    "check_database_url",
    "check_redis_url",
    "parse_env_value",
]


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
        "order requests in progress per process before shedding with 429 overloaded (default 1000)",
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
        "seconds a client has to send a request head, and then its body, before 408 "
        "request_timeout and the connection closed (default 5)",
    ),
    (
        "FLASHSALE_MAX_CONNECTIONS",
        "max_connections",
        "client connections per process; past it a new one replaces the oldest waiting for a "
        "request, else is closed (default 0: the open-file limit less a quarter, at most 1024, "
        "kept for the process's own connections to Redis and PostgreSQL)",
    ),
    (
        "FLASHSALE_IDLE_TIMEOUT",
        "idle_timeout_s",
        "seconds a connection may stay open without sending a request before it is closed "
        "(default 75: longer than a load balancer's usual 60)",
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
    (
        "FLASHSALE_JWT_SECRET",
        "jwt_secret",
        "accept HS256 JWT bearer tokens signed with this secret (beside flashsale's own tokens)",
    ),
    (
        "FLASHSALE_JWT_PUBLIC_KEY",
        "jwt_public_key",
        "accept RS256/ES256 JWTs verified with this PEM public key file",
    ),
    ("FLASHSALE_JWT_JWKS", "jwt_jwks", "accept RS256/ES256 JWTs verified with this JWKS file (by kid)"),
    ("FLASHSALE_JWT_ISSUER", "jwt_issuer", "the JWT issuer ('iss') required, when set"),
    ("FLASHSALE_JWT_AUDIENCE", "jwt_audience", "the JWT audience ('aud') required, when set"),
    ("FLASHSALE_JWT_USER_CLAIM", "jwt_user_claim", "the JWT claim that holds the user id (default sub)"),
    (
        "FLASHSALE_JWT_MEMBER_CLAIM",
        "jwt_member_claim",
        "the JWT claim that says the buyer is a member (default member)",
    ),
    (
        "FLASHSALE_JWT_ALGORITHMS",
        "jwt_algorithms",
        "JWT algorithms accepted, comma-separated (default HS256 with a secret, RS256,ES256 with a key)",
    ),
    (
        "FLASHSALE_ROOM_POLL_RATE",
        "room_poll_rate",
        "waiting-room polls per second per buyer, per process (default 2)",
    ),
    (
        "FLASHSALE_ROOM_POLL_BURST",
        "room_poll_burst",
        "burst allowance of the waiting-room poll limit (default 5)",
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
    idle_timeout_s: float = 75.0
    max_connections: int = 0
    redis_timeout_s: float = 2.0
    sku_cache_s: float = 0.25
    sold_out_cache_s: float = 0.5
    sale_cache_s: float = 0.5
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_jwks: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_user_claim: str = "sub"
    jwt_member_claim: str = "member"
    jwt_algorithms: str | None = None
    room_poll_rate: float = 2.0
    room_poll_burst: int = 5
    log_level: str = "INFO"
    access_log: bool = False

    def __post_init__(self) -> None:
        check_redis_url(self.redis_url)
        if self.database_url is not None:
            check_database_url(self.database_url)

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


def _check_url(url: str, schemes: tuple[str, ...], var: str, example: str) -> None:
    """One clear line when ``url`` cannot name the store ``var`` names (the driver would
    raise a traceback instead, several lines down a start-up)."""
    problem = ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here, not in the driver
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme.lower() not in schemes:
            problem = f"it must start with {' or '.join(s + '://' for s in schemes)}"
    if problem:
        flag = "--" + var.removeprefix("FLASHSALE_").lower().replace("_", "-")
        raise SettingsError(
            f"{var} (or {flag}) {redact(url)!r} is not a usable URL: {problem}; write it as {example}"
        )


def check_redis_url(url: str) -> None:
    """SettingsError unless ``url`` is a Redis URL redis-py can use."""
    _check_url(url, ("redis", "rediss", "unix"), "FLASHSALE_REDIS_URL", "redis://HOST:6379/0")


def check_database_url(url: str) -> None:
    """SettingsError unless ``url`` is a PostgreSQL URL (asyncpg takes no other)."""
    _check_url(
        url,
        ("postgresql", "postgres"),
        "FLASHSALE_DATABASE_URL",
        "postgresql://USER@HOST:5432/DATABASE",
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
