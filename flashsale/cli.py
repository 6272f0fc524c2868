"""The ``flashsale`` command line: one sub-command per module in ``COMMAND_MODULES``.

Each listed module exposes ``register(subparsers)``, which adds its sub-command(s) and
sets ``func`` (returning an exit code) on the parser. Modules are imported lazily so
that ``flashsale --help`` works with only the base install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "flashsale.rehearse_cli",
    "flashsale.drill_cli",
    "flashsale.service_cli",
    "flashsale.pipeline_cli",
    "flashsale.embedded_cli",
    "benchmarks.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashsale",
        description=(
            "Reference backend and load-test kit for flash sales: an aiohttp order service "
            "that reserves stock atomically in Redis and never oversells, a worker that "
            "drains orders into PostgreSQL at its own pace, and Locust drills that replay "
            "a Double 11 midnight opening and check nothing was oversold, lost or duplicated."
        ),
        epilog="Start with `flashsale rehearse`; every sub-command has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an extra is not installed: say which
            missing = getattr(exc, "name", None) or str(exc)
            stub = sub.add_parser(name.rsplit(".", 1)[-1], help=f"(unavailable: {missing} not installed)")
            stub.set_defaults(func=lambda _a, m=missing: _missing(m))
            continue
        module.register(sub)
    return parser


def _missing(module: str) -> int:
    print(
        f"flashsale: this command needs '{module}', which is not installed.\n"
        "Install everything with: pip install 'flashsale[all]'",
        file=sys.stderr,
    )
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    return int(func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
