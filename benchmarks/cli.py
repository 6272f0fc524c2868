"""``flashsale bench``: the benchmark runner as a sub-command of the ``flashsale`` CLI
(listed in ``flashsale.cli.COMMAND_MODULES``). Same options as ``python -m benchmarks``."""

from __future__ import annotations

import argparse
from typing import Any

from .runner import DESCRIPTION, add_arguments, epilog, run

__all__ = ["register"]


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="measure the ways of holding stock side by side (speed and units oversold)",
        description=DESCRIPTION,
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
