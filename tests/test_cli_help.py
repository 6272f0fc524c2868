"""``--help`` read from an SRE's seat: ``flashsale --help`` says what each exit status means
(the one table of :mod:`flashsale.exit_codes`) and where to start when Redis lost data;
``flashsale recover --help`` says when to run it, that it is safe to run again, that a
Redis Cluster is refused, and what each status it can end with means. And
``flashsale recover`` against a Redis that does not answer is one line and exit 4 (not
ready: run it again), not a traceback that exits 1 ("SLO missed")."""

from __future__ import annotations

import re
from typing import Any

import pytest
from cli_support import flashsale

from flashsale import exit_codes

PASSWORD = "s3cretpw"


def _flat(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


def test_the_root_help_says_what_every_exit_status_means() -> None:
    done = flashsale("--help")
    assert done.returncode == 0, done.stderr
    text = _flat(done.stdout)
    for code, meaning in exit_codes.MEANING.items():
        assert f"{code} {meaning}" in text, (code, done.stdout)
    assert "flashsale recover --check" in text, done.stdout  # where to start after a data loss


def test_recover_help_says_when_to_run_it_and_what_it_exits_with() -> None:
    done = flashsale("recover", "--help")
    assert done.returncode == 0, done.stderr
    text = _flat(done.stdout)
    for said in (
        "sale_fenced",  # when: the service fenced a sale
        "Safe to run again",
        "Redis Cluster",  # refused there
        "FLASHSALE_REDIS_URL",
        "FLASHSALE_DATABASE_URL",
    ):
        assert said in text, (said, done.stdout)
    statuses = _statuses(done.stdout)
    assert set(statuses) == {"0", "2", "4", "64"}, done.stdout
    assert "--forget" in statuses["64"] and "Redis Cluster" in statuses["64"], statuses


def _statuses(help_text: str) -> dict[str, str]:
    """A help's "exit status:" table: code -> its row, wrapped lines joined."""
    assert "exit status:" in help_text, help_text
    statuses: dict[str, str] = {}
    code = ""
    for line in help_text.split("exit status:")[1].splitlines():
        row = re.match(r"\s+(\d+)\s+(\S.*)$", line)
        if row:
            code = row[1]
            statuses[code] = row[2]
        elif line.strip():
            statuses[code] += " " + line.strip()
    return statuses


@pytest.mark.parametrize(
    ("command", "codes"),
    [
        ("audit", {"0", "2", "4", "64"}),
        ("migrate", {"0", "4", "64"}),
        ("serve", {"0", "64"}),
        ("worker", {"0", "4", "64"}),
    ],
)
def test_the_commands_an_sre_runs_by_hand_list_their_exit_statuses(command: str, codes: set[str]) -> None:
    done = flashsale(command, "--help")
    assert done.returncode == 0, done.stderr
    assert set(_statuses(done.stdout)) == codes, done.stdout


@pytest.mark.parametrize("command", ["serve", "worker", "audit"])
def test_the_commands_that_refuse_a_cluster_node_as_one_server_say_so_under_64(command: str) -> None:
    """Each stops with exit 64 on a node of a Redis Cluster named as one server
    (tests/test_cluster_node_as_one_server.py): its help says so, and what to set."""
    done = flashsale(command, "--help")
    assert done.returncode == 0, done.stderr
    said = _statuses(done.stdout)["64"]
    assert "Redis Cluster" in said and "FLASHSALE_REDIS_CLUSTER=1" in said, said


@pytest.mark.parametrize("mode", [["--check"], []], ids=repr)
async def test_recover_against_a_redis_that_does_not_answer_is_not_ready(
    mode: list[str], pipeline_db_url: str, pipeline_pool: Any
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:1/0"
    done = flashsale("recover", *mode, "--redis-url", url, "--database-url", pipeline_db_url)
    assert done.returncode == exit_codes.NOT_READY, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in done.stderr and PASSWORD not in done.stderr


async def test_forget_needs_no_redis(pipeline_db_url: str, pipeline_pool: Any) -> None:
    """Retiring a sale writes PostgreSQL only: a Redis that is down does not stop it."""
    done = flashsale(
        "recover",
        "--forget",
        "d11",
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--database-url",
        pipeline_db_url,
    )
    assert done.returncode == exit_codes.USAGE, done.stderr  # nothing recorded of d11 here
    assert "the fence has no sale 'd11' recorded" in done.stdout, done.stdout + done.stderr


def test_serve_help_says_what_the_fence_does_and_where_it_is_off() -> None:
    done = flashsale("serve", "--help")
    assert done.returncode == 0, done.stderr
    text = _flat(done.stdout)
    for said in ("sale_fenced", "flashsale recover", "Redis Cluster", "/readyz"):
        assert said in text, (said, done.stdout)
