"""Headless Chromium (Debian's package, driven by Playwright through ``executable_path``) in
front of the real in-process gateway from the integration harness.

Playwright's own browser download cannot work here, so nothing calls ``playwright install``:
without ``/usr/bin/chromium`` these tests skip, except under CI (env ``CI`` set), where a
missing browser is a failure. ``SCREENSHOTS=1`` also saves the main pages as PNGs under
``docs/screenshots/`` (at desktop and phone widths); normal runs write nothing.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright

from tests.integration.conftest import make_gateway

__all__ = ["make_gateway"]

CHROMIUM = Path(os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HAVE_CHROMIUM = CHROMIUM.is_file()
DESKTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=390, height=844)
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

Shoot = Callable[[Page, str], Awaitable[None]]


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        reason = f"{CHROMIUM} is missing (Debian: apt-get install chromium; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run under CI: {reason}")
        pytest.skip(reason)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                          args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def shoot() -> Shoot:
    """``await shoot(page, "login")``: with SCREENSHOTS=1, save the page as
    ``login-desktop.png`` and ``login-phone.png``; otherwise do nothing."""
    enabled = os.environ.get("SCREENSHOTS") == "1"

    async def take(page: Page, name: str) -> None:
        if not enabled:
            return
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        try:
            for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
                await page.set_viewport_size(size)
                await page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"),
                                      full_page=True, animations="disabled", caret="hide")
        finally:
            await page.set_viewport_size(DESKTOP)

    return take
