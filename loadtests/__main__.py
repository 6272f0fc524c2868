"""``python -m loadtests``: where flashsale's locustfile is installed, and every option a
locustfile takes.

    python -m loadtests path                  the installed loadtests/surge.py, for `locust -f`
    python -m loadtests help [LOCUSTFILE]     Locust's --help with the locustfile's options

``locust -f FILE --help`` prints Locust's help before it imports FILE, so the options a
locustfile adds (the kit's --shape, --peak-rps, --slo …, and yours) are missing there; this
imports the locustfile first.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from loadtests import exit_codes


def surge_path() -> Path:
    """Where ``loadtests/surge.py`` (flashsale's drill) is installed, found without importing it."""
    spec = importlib.util.find_spec("loadtests.surge")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin)


def print_help(locustfile: Path) -> int:
    import locust  # noqa: F401 - patches the standard library for gevent before the locustfile runs
    from locust.argument_parser import get_parser
    from locust.util.load_locustfile import load_locustfile

    from loadtests.plugin import OPTIONS_TITLE

    if not locustfile.is_file():
        print(f"python -m loadtests help: no locustfile at {locustfile}", file=sys.stderr)
        return exit_codes.USAGE
    load_locustfile(str(locustfile))
    print(
        f"Options of locust -f {locustfile}: the kit's under {OPTIONS_TITLE!r}, "
        "the locustfile's own (parser.add_argument) under 'Common options'.\n"
    )
    get_parser().print_help()
    return exit_codes.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("path", help="print the path of the installed loadtests/surge.py (for locust -f)")
    h = sub.add_parser("help", help="Locust's --help including a locustfile's own options")
    h.add_argument("locustfile", nargs="?", type=Path, default=None, help="default: loadtests/surge.py")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exit_codes.USAGE if exc.code else exit_codes.OK
    if args.command == "path":
        print(surge_path())
        return exit_codes.OK
    return print_help(args.locustfile or surge_path())


if __name__ == "__main__":
    raise SystemExit(main())
