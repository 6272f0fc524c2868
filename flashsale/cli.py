"""The ``flashsale`` command line: one sub-command per module in ``COMMAND_MODULES``.

Each listed module exposes ``register(subparsers)``, which adds its sub-command(s) and
sets ``func`` (returning an exit code) on the parser. Modules are imported lazily so
that ``flashsale --help`` works with only the base install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from flashsale import exit_codes

COMMAND_MODULES: tuple[str, ...] = (
    "flashsale.drills.cli",  # rehearse, capacity, drill
    "flashsale.fence.cli",  # recover
    "flashsale.service.cli",  # serve, token
    "flashsale.pipeline.cli",  # migrate, worker, audit
    "flashsale.runtime.cli",  # servers
)


class CommandParser(argparse.ArgumentParser):
    """argparse with this project's conventions: a usage error exits 64 (never a verdict's
    code: see :mod:`flashsale.exit_codes`), and an abbreviated option is refused rather
    than taken for the one it starts (``--peak`` is not ``--peak-rps``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands: Mapping[str, argparse.ArgumentParser] = {}  # name -> sub-command parser

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exit_codes.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="flashsale",
        description=(
            "Reference backend and load-test kit for flash sales: an aiohttp order service "
            "that reserves stock atomically in Redis and never oversells, a worker that "
            "drains orders into PostgreSQL at its own pace, and Locust drills that replay "
            "a Double 11 midnight opening and check nothing was oversold, lost or duplicated."
        ),
        epilog="Start with `flashsale rehearse`; every sub-command has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    parser.commands = sub.choices
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
    return exit_codes.USAGE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # say it with the sub-command's usage, which lists the flags it does take
        command = parser.commands.get(getattr(args, "command", None) or "")
        (command or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    return int(func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
