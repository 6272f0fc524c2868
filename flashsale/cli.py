"""The ``flashsale`` command line: one sub-command per module in ``COMMAND_MODULES``.

Each listed module exposes ``register(subparsers)``, which adds its sub-command(s) and
sets ``func`` (returning an exit code) on the parser. Registering imports nothing beyond
the base install (``redis`` and the standard library), so ``flashsale --help`` and
``--version`` work without extras; a command imports what it needs when it runs, and a
missing extra is named (``pip install 'flashsale[service]'``), never a traceback.

Shared here by every wing's commands: :func:`add_store_options` (``--redis-url`` /
``--database-url``, the same two flags and meanings on every command that talks to the
stores) and :func:`exit_status` (a help's table of the statuses a command ends with, in
the words of :mod:`flashsale.exit_codes`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from flashsale import exit_codes
from flashsale.settings import Settings, SettingsError

__all__ = [
    "CommandParser",
    "add_store_options",
    "both_stores",
    "build_parser",
    "exit_status",
    "extra_providing",
    "main",
    "store_overrides",
]

COMMAND_MODULES: tuple[str, ...] = (
    "flashsale.drills.cli",  # rehearse, capacity, drill
    "flashsale.fence.cli",  # recover
    "flashsale.service.cli",  # serve, token
    "flashsale.pipeline.cli",  # migrate, worker, audit
    "flashsale.runtime.cli",  # servers
)

#: Import names that differ from their distribution's name (pyproject's extras list distributions).
_IMPORT_NAMES = {"hdrhistogram": "hdrh", "prometheus-client": "prometheus_client", "pyjwt": "jwt"}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, but a description or epilog keeps its line breaks: each line is wrapped
    on its own, and a line that starts with a space (a table row) is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n".join(
            indent + line if line.startswith(" ") or not line else fill(line, width, indent)
            for line in text.split("\n")
        )


def exit_status(codes: Mapping[int, str] | None = None, *, heading: str = "exit status") -> str:
    """A help's table of exit statuses: ``codes`` (code -> what it means for this command),
    by default every status with its meaning from :mod:`flashsale.exit_codes`."""
    rows = [
        textwrap.fill(meaning, 78, initial_indent=f"  {code:<4}", subsequent_indent=" " * 6)
        for code, meaning in (exit_codes.MEANING if codes is None else codes).items()
    ]
    return f"{heading}:\n" + "\n".join(rows)


class CommandParser(argparse.ArgumentParser):
    """argparse with this project's conventions: a usage error exits 64 (never a verdict's
    code: see :mod:`flashsale.exit_codes`), an abbreviated option is refused rather than
    taken for the one it starts (``--peak`` is not ``--peak-rps``), and help text keeps
    its line breaks (:class:`HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.commands: Mapping[str, argparse.ArgumentParser] = {}  # name -> sub-command parser

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exit_codes.USAGE, f"{self.prog}: error: {message}\n")


def add_store_options(parser: argparse.ArgumentParser, *, redis: bool = True, database: bool = True) -> None:
    """``--redis-url`` / ``--database-url``: they win over ``FLASHSALE_REDIS_URL`` /
    ``FLASHSALE_DATABASE_URL`` (read them with :func:`store_overrides`)."""
    if redis:
        parser.add_argument("--redis-url", metavar="URL", help="Redis URL (default: $FLASHSALE_REDIS_URL)")
    if database:
        parser.add_argument(
            "--database-url", metavar="URL", help="PostgreSQL URL (default: $FLASHSALE_DATABASE_URL)"
        )


def store_overrides(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """``FLASHSALE_REDIS_URL`` / ``FLASHSALE_DATABASE_URL`` as the command sees them: the
    environment with the flags of :func:`add_store_options` laid over it (an empty
    variable counts as unset)."""
    env = {k: v for k, v in environ.items() if k.startswith("FLASHSALE_") and v.strip()}
    for flag, var in (("redis_url", "FLASHSALE_REDIS_URL"), ("database_url", "FLASHSALE_DATABASE_URL")):
        value = getattr(args, flag, None)
        if value:
            env[var] = value
    return env


def both_stores(args: argparse.Namespace, *, why: str) -> Settings:
    """Settings for a command that reads both stores: the environment with the flags laid
    over it; SettingsError saying what to set (and ``why``) when either store is not named,
    or is not a usable URL."""
    env = store_overrides(args, os.environ)
    missing = [var for var in ("FLASHSALE_REDIS_URL", "FLASHSALE_DATABASE_URL") if var not in env]
    if missing:
        raise SettingsError(f"{why}: set {' and '.join(missing)} (or pass --redis-url and --database-url)")
    return Settings.from_env(env)


def _version() -> str:
    try:
        return importlib.metadata.version("flashsale")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="flashsale",
        description=(
            "Reference backend and load-test kit for flash sales: an aiohttp order service "
            "that reserves stock atomically in Redis and never oversells, a worker that "
            "drains orders into PostgreSQL at its own pace, and Locust drills that replay "
            "a Double 11 midnight opening and check nothing was oversold, lost or duplicated."
        ),
        epilog=(
            "Start with `flashsale rehearse`; every sub-command has its own --help.\n\n"
            "In production: `flashsale migrate` once per upgrade, then `flashsale serve` and "
            "`flashsale worker`. If Redis lost data (orders answer 503 sale_fenced, /readyz "
            'reports "fenced: <sales>"): `flashsale recover --check`, then `flashsale recover`. '
            "After an incident: `flashsale audit`.\n\n" + exit_status(heading="exit status (every command)")
        ),
    )
    parser.add_argument("--version", action="version", version=f"flashsale {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    parser.commands = sub.choices
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def extra_providing(module: str) -> str | None:
    """The extra of this package (``pyproject.toml``'s optional dependencies) that installs
    ``module``, or None when none lists it (e.g. a dependency of a dependency)."""
    top = module.split(".")[0]
    try:
        requirements = importlib.metadata.requires("flashsale") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*).*extra\s*==\s*['\"]([\w-]+)['\"]", requirement)
        if m is None or m[1].lower() == "flashsale":  # the "all" extra lists the others
            continue
        distribution = m[1].lower()
        if _IMPORT_NAMES.get(distribution, distribution.replace("-", "_")) == top:
            return m[2]
    return None


def _missing(command: str, module: str) -> int:
    extra = extra_providing(module)
    install = f"pip install 'flashsale[{extra}]'" if extra else "pip install 'flashsale[all]'"
    from_extra = f" (the '{extra}' extra)" if extra else ""
    print(
        f"flashsale {command}: needs {module}{from_extra}, which is not installed. Install it with: {install}",
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
    try:
        return int(func(args) or 0)
    except ModuleNotFoundError as exc:  # an extra is not installed: say which, not a traceback
        if not exc.name or exc.name.split(".")[0] in ("flashsale", "inventory", "loadtests"):
            raise  # our own module missing is a bug, not an extra to install
        return _missing(args.command, exc.name)


if __name__ == "__main__":
    raise SystemExit(main())
