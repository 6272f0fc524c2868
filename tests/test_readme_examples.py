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
    """Twice in a row, as a reader tries it: the second run finds the SKU stocked and its
    request ids already answered, and prints the same."""
    example = tmp_path / "embed.py"
    example.write_text(_python_block(_section("Embedding the inventory module")))
    env = dict(os.environ, FLASHSALE_REDIS_URL=redis_url)
    for run in ("first", "second"):
        done = subprocess.run(
            [sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (run, done.stderr)
        assert "refused: limit_exceeded" in done.stdout, run
        assert "in_stock 98 2" in done.stdout, run
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
    from flashsale.pipeline.worker_settings import WORKER_ENV_DOC
    from flashsale.settings import ENV_DOC

    missing = [var for var, _, _ in (*ENV_DOC, *WORKER_ENV_DOC) if f"`{var}`" not in README]
    assert not missing, f"README's settings tables lack {missing}"


def test_every_command_the_readme_names_exists() -> None:
    from flashsale.cli import build_parser

    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    named = set(re.findall(r"(?:^|[\s`/])flashsale ([a-z]+)", README, re.M))
    assert named, "the README names commands"
    assert named <= commands, f"README names commands that do not exist: {sorted(named - commands)}"


def _code_in(text: str) -> list[str]:
    """The lines of a Markdown text's code blocks, and its inline code spans."""
    lines = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def test_every_command_and_flag_the_docs_show_exists() -> None:
    """``flashsale <command> --flag`` as README and docs/ show it, in code: the command
    exists and takes the flag (an SRE copies these during an incident)."""
    from flashsale.cli import build_parser

    commands = dict(build_parser().commands)
    shown, wrong = 0, []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for code in _code_in(doc.read_text(encoding="utf-8")):
            for command, rest in re.findall(r"(?:^|[\s;|&(])flashsale ([a-z][a-z-]*)([^;|&#\n]*)", code):
                shown += 1
                if command not in commands:
                    wrong.append(f"{doc.name}: flashsale {command}")
                    continue
                flags = {o for a in commands[command]._actions for o in a.option_strings}
                wrong += [
                    f"{doc.name}: flashsale {command} {flag}"
                    for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
                    if flag not in flags
                ]
    assert shown > 50, f"only {shown} commands found in the docs: the pattern broke"
    assert not wrong, f"the docs show commands or flags that do not exist: {wrong}"


def test_the_exit_code_table_is_one_table() -> None:
    """Every judging command shares flashsale.exit_codes; the drill kit's 0-3 mean the same,
    and a usage error never shares a code with a verdict."""
    from flashsale import exit_codes
    from loadtests import exit_codes as kit

    for name in ("OK", "SLO_MISSED", "INVARIANT_VIOLATED", "RUN_INVALID"):
        assert getattr(kit, name) == getattr(exit_codes, name), name
    verdicts = {exit_codes.OK, exit_codes.SLO_MISSED, exit_codes.INVARIANT_VIOLATED, exit_codes.RUN_INVALID}
    assert exit_codes.USAGE not in verdicts and exit_codes.NOT_READY not in verdicts
    for code, meaning in exit_codes.MEANING.items():
        assert f"| {code} " in README and meaning.split(":")[0] in README, (code, meaning)


def test_a_usage_error_is_not_a_verdict() -> None:
    """A typo in a CI script must never read like an oversell: bad flags exit 64, and an
    abbreviated option is refused instead of taken for the one it starts."""
    import subprocess
    import sys

    from flashsale import exit_codes

    for args in (["rehearse", "--no-such-flag"], ["rehearse", "--peak", "100"], ["audit", "--wait", "x"]):
        done = subprocess.run(
            [sys.executable, "-m", "flashsale", *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == exit_codes.USAGE, (args, done.returncode, done.stderr)
        assert "usage: flashsale " + args[0] in done.stderr, done.stderr
