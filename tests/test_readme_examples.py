"""The README's code runs as written: its embedding example is executed against the real
Redis, and the commands it tells people to type exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _python_block(section: str) -> str:
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block"
    return match.group(1)


async def test_embedding_example_runs(redis_client: Redis, redis_url: str, tmp_path: Path) -> None:
    example = tmp_path / "embed.py"
    example.write_text(_python_block(_section("Embedding the inventory module")))
    env = dict(os.environ, FLASHSALE_REDIS_URL=redis_url)
    done = subprocess.run([sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "refused: limit_exceeded" in done.stdout
    assert "in_stock 98 2" in done.stdout
    # It really wrote to Redis: the sale's stream carries its events.
    assert await redis_client.xlen("{fs:spring-drop}:events") >= 4


def test_readme_commands_are_the_ci_command() -> None:
    two = re.findall(r"```bash\n(.*?)\n```", _section("Two commands"), re.S)
    assert len(two) == 2, "the README shows two commands"
    rehearse, test = two
    assert rehearse.rstrip().endswith("flashsale rehearse")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test.strip() in ci, ".ci/run must run the README's test command verbatim"


def test_every_setting_is_documented_in_the_readme() -> None:
    from flashsale.settings import ENV_DOC
    from flashsale.worker import WORKER_ENV_DOC

    missing = [var for var, _, _ in (*ENV_DOC, *WORKER_ENV_DOC) if f"`{var}`" not in README]
    assert not missing, f"README's settings tables lack {missing}"


def test_every_command_the_readme_names_exists() -> None:
    from flashsale.cli import build_parser

    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    named = set(re.findall(r"(?:^|[\s`/])flashsale ([a-z]+)", README, re.M))
    assert named, "the README names commands"
    assert named <= commands, f"README names commands that do not exist: {sorted(named - commands)}"
