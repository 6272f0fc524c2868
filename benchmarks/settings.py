"""How hard and how long a benchmark run pushes: one frozen settings object, read from
``FLASHSALE_BENCH_*`` environment variables and overridden by command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["BenchSettings"]


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"{name}={raw!r} is not a number; unset it or give e.g. {name}={default:g}"
        ) from None
    if value <= 0:
        raise ValueError(f"{name} must be positive (got {raw!r})")
    return value


@dataclass(frozen=True)
class BenchSettings:
    """``quick`` is the CI mode: a few seconds per benchmark, same code paths."""

    quick: bool = False
    #: Concurrent clients in the strategy comparison (one connection each).
    clients: int = 32
    #: Concurrent callers of the inventory library in ``inventory_bench``.
    callers: int = 256
    #: Length of each timed figure, and the target length of each run-until-sold-out.
    seconds: float = 5.0
    #: Length of the short run that sizes the stock of a run-until-sold-out.
    probe_s: float = 1.0
    #: Connections of the raw EVALSHA ceiling (redis-benchmark's default is 50).
    ceiling_connections: int = 50
    #: Rounds of each benchmark that judges a change (inventory, service, burst): the
    #: figure is the median round, its spread is shown (``benchmarks.rounds``).
    rounds: int = 5
    #: Rounds of the generator-cost comparison (each is a whole rehearsal: ~1 minute).
    generator_rounds: int = 3
    #: Buyers of the opening burst, each on its own fresh connection.
    burst_buyers: int = 1000
    #: The rehearsal whose Locust process the generator comparison measures: peak arrivals
    #: per second and seconds of arrivals (``flashsale rehearse --peak-rps … --duration …``).
    surge_peak_rps: float = 400.0
    surge_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{name} must be positive (got {value})")

    @classmethod
    def from_env(cls, *, quick: bool = False, environ: Mapping[str, str] | None = None) -> BenchSettings:
        env = os.environ if environ is None else environ
        base = (
            cls(
                quick=True,
                seconds=1.0,
                probe_s=0.3,
                rounds=1,
                generator_rounds=1,
                surge_peak_rps=100.0,
                surge_seconds=6.0,
            )
            if quick
            else cls()
        )
        return replace(
            base,
            clients=int(_number(env, "FLASHSALE_BENCH_CLIENTS", base.clients)),
            callers=int(_number(env, "FLASHSALE_BENCH_CALLERS", base.callers)),
            seconds=_number(env, "FLASHSALE_BENCH_SECONDS", base.seconds),
            rounds=int(_number(env, "FLASHSALE_BENCH_ROUNDS", base.rounds)),
        )

    def with_overrides(self, **overrides: Any) -> BenchSettings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def as_json(self) -> dict[str, Any]:
        return asdict(self)
