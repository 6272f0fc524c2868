"""What the browser tests share: Debian's headless Chromium driven by Playwright (no browser
download: Playwright only launches /usr/bin/chromium, or $FLASHSALE_CHROMIUM), a page whose
errors are collected, and a folder for screenshots (``$FLASHSALE_TEST_ARTIFACTS/<name>/`` or
the test's tmp dir).

Without Chromium or Playwright a browser test is skipped locally and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("FLASHSALE_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that talks to the outside world or needs a GPU or a sandbox.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_browser(test: str) -> None:
    """Skip ``test`` (or fail it in CI) when Chromium or Playwright is missing."""
    missing = []
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing.append(f"Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append(
            "the playwright package (pip install 'flashsale[test]'; no `playwright install` needed)"
        )
    if not missing:
        return
    message = f"the {test} needs " + " and ".join(missing)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def artifacts(tmp_path: Path, name: str) -> Path:
    root = os.environ.get("FLASHSALE_TEST_ARTIFACTS")
    folder = (Path(root) if root else tmp_path) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@asynccontextmanager
async def browser_page(
    problems: list[str], *, viewport: dict[str, int], offline: bool = False
) -> AsyncIterator[Any]:
    """A page in headless Chromium (``offline``: with the network cut); page errors and
    console errors land in ``problems``."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport=viewport, offline=offline)
            page = await context.new_page()
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda msg: (
                    problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
                ),
            )
            page.set_default_timeout(15_000)
            yield page
        finally:
            await browser.close()
