"""The web console end to end in headless Chromium: log in, connect a provider through the
fake authorization server's own login and consent form, disconnect, create and revoke a
key, a wrong password, a connect link's confirmation page, a declined consent, and forged
form posts from another origin."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.browser.conftest import DESKTOP, Shoot
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.browser

PW = "correct horse battery"
PROVIDERS = {"github": {"preset": "github"}}  # no client id: shown as not usable


async def _context(chromium: Browser) -> tuple[BrowserContext, Page, list[str]]:
    """A fresh browser profile; collects CSP violations (the pages must cause none)."""
    ctx = await chromium.new_context(viewport=DESKTOP, locale="en-GB", color_scheme="light")
    page = await ctx.new_page()
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    return ctx, page, violations


async def _log_in(page: Page, name: str, password: str) -> None:
    await page.get_by_label("Identity").fill(name)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()


def _row(page: Page, provider: str) -> Any:
    return page.locator(f"#provider-{provider}")


async def test_login_connect_disconnect_and_keys(make_gateway: Any, chromium: Browser,
                                                 shoot: Shoot) -> None:
    gw: Gateway = await make_gateway(auto_approve=False, provider={"scopes": ["read", "write"]},
                                     config={"providers": PROVIDERS})
    await gw.identity("alice", PW)
    ctx, page, violations = await _context(chromium)

    # Not logged in: the dashboard sends us to the login page.
    await page.goto(str(gw.url / "_gateway/"))
    await expect(page).to_have_url(re.compile(r"/_gateway/login\?next="))
    await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    await expect(page.get_by_label("Identity")).to_be_focused()  # autofocus: type right away
    await shoot(page, "login")

    # A wrong password is refused with a clear message, and nobody is logged in.
    await _log_in(page, "alice", "not the password")
    await expect(page.get_by_role("alert")).to_contain_text("Wrong identity name or password")
    assert not [c for c in await ctx.cookies() if c["name"] == "gateway_session"]

    await _log_in(page, "alice", PW)
    await expect(page).to_have_url(str(gw.url / "_gateway/"))
    await expect(page.get_by_text("Logged in as")).to_contain_text("alice")
    await expect(_row(page, "fake").locator(".badge")).to_have_text("Not connected")
    await expect(_row(page, "github").locator(".badge")).to_have_text("Not usable")
    await expect(_row(page, "github")).to_contain_text("client_id is not set")
    [session] = [c for c in await ctx.cookies() if c["name"] == "gateway_session"]
    assert session["httpOnly"] and session["sameSite"] == "Lax"
    await page.keyboard.press("Tab")  # keyboard users can skip the header
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()

    # Connect: through the provider's own login and consent form, and back.
    await page.get_by_role("button", name="Connect fake").click()
    await expect(page.locator("#username")).to_be_visible()
    assert page.url.startswith(str(gw.auth.url / "authorize"))
    await page.locator("#username").fill("alice")
    await page.locator("#approve").click()
    await expect(page.get_by_role("heading", name="fake connected")).to_be_visible()
    await expect(page.locator("main")).to_contain_text("Programs using this identity's gateway key")
    await page.get_by_role("link", name="Back to the dashboard").click()
    row = _row(page, "fake")
    await expect(row.locator(".badge")).to_have_text("Connected")
    await expect(row).to_contain_text("read")
    await expect(row).to_contain_text("Token expires")
    await expect(page.locator("pre", has_text="/fake/")).to_be_visible()
    await shoot(page, "dashboard")

    # The connection really works for a program holding alice's key.
    [conn] = await gw.services.store.list_connections()
    assert conn.provider == "fake" and conn.status == "active"

    # Disconnect.
    await row.get_by_role("button", name="Disconnect fake").click()
    await expect(page.get_by_role("status")).to_contain_text("fake disconnected")
    await expect(_row(page, "fake").locator(".badge")).to_have_text("Not connected")
    assert await gw.services.store.list_connections() == []
    assert gw.auth.hits["revoke"] >= 1

    # Create a key: shown once, and it authenticates.
    await page.get_by_role("button", name="Create a new key").click()
    key = (await page.locator("#new-key").inner_text()).strip()
    assert key.startswith("gwk_")
    await shoot(page, "new-key")
    async with aiohttp.ClientSession() as program:
        resp = await program.get(gw.url / "fake/x", headers={"Authorization": f"Bearer {key}"})
        assert resp.headers["Gateway-Error"] == "consent_required"  # known key, no connection

    # Revoke it: gone from the list, and refused from now on.
    await page.goto(str(gw.url / "_gateway/"))
    await expect(page.locator("#new-key")).to_have_count(0)  # never shown again
    prefix = key[:12]
    await page.get_by_role("button", name=f"Revoke key {prefix}").click()
    await expect(page.get_by_role("status")).to_contain_text(f"Key {prefix}… revoked")
    await expect(page.get_by_role("button", name=f"Revoke key {prefix}")).to_have_count(0)
    async with aiohttp.ClientSession() as program:
        resp = await program.get(gw.url / "fake/x", headers={"Authorization": f"Bearer {key}"})
        assert resp.headers["Gateway-Error"] == "unauthenticated"

    # Log out (a POST), and the dashboard is closed again.
    await page.get_by_role("button", name="Log out").click()
    await expect(page.get_by_role("status")).to_contain_text("You are logged out.")
    await page.goto(str(gw.url / "_gateway/"))
    await expect(page).to_have_url(re.compile(r"/_gateway/login"))
    assert violations == []
    await ctx.close()


async def test_connect_link_confirmation_and_declined_consent(make_gateway: Any,
                                                               chromium: Browser,
                                                               shoot: Shoot) -> None:
    gw: Gateway = await make_gateway(auto_approve=False)
    key = await gw.identity("bob", PW)
    async with aiohttp.ClientSession() as program:
        resp = await program.post(gw.url / "_gateway/api/connect/fake",
                                  headers={"Authorization": f"Bearer {key}"})
        link = (await resp.json())["connect_url"]
    ctx, page, violations = await _context(chromium)

    await page.goto(link)  # a program handed this link to its user
    await expect(page).to_have_url(re.compile(r"/_gateway/login\?next="))
    await _log_in(page, "bob", PW)
    await expect(page.get_by_role("heading", name="Connect fake?")).to_be_visible()
    facts = page.locator("dl.facts")
    await expect(facts).to_contain_text("bob")
    await expect(facts).to_contain_text("fake")
    await shoot(page, "confirm")

    await page.get_by_role("button", name="Continue to fake").click()
    await expect(page.locator("#deny")).to_be_visible()
    await page.locator("#deny").click()
    await expect(page.get_by_role("heading", name="fake was not connected")).to_be_visible()
    await expect(page.get_by_role("alert")).to_contain_text("You declined access.")
    await expect(page.get_by_role("link", name="Try again")).to_be_visible()
    await expect(page.get_by_role("link", name="Back to the dashboard")).to_be_visible()
    await shoot(page, "failure")
    assert await gw.services.store.list_connections() == []

    # "Try again" starts a fresh flow for the same identity at the provider.
    await page.get_by_role("link", name="Try again").click()
    await expect(page.locator("#approve")).to_be_visible()
    await page.locator("#approve").click()
    await expect(page.get_by_role("heading", name="fake connected")).to_be_visible()
    assert len(await gw.services.store.list_connections()) == 1
    assert violations == []
    await ctx.close()


async def test_forged_posts_from_other_origins_are_refused(make_gateway: Any, chromium: Browser,
                                                           aiohttp_server: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("carol", PW)

    async def evil(request: web.Request) -> web.Response:
        """A page elsewhere that posts to the gateway without a CSRF token."""
        return web.Response(content_type="text/html", text=f"""<!doctype html>
<form method="post" action="{gw.url}/_gateway/keys"><input type="hidden" name="csrf" value="guess">
<button id="go">Win a prize</button></form>""")

    app = web.Application()
    app.router.add_get("/", evil)
    evil_server = await aiohttp_server(app)
    ctx, page, _ = await _context(chromium)
    await page.goto(str(gw.url / "_gateway/login"))
    await _log_in(page, "carol", PW)
    await expect(page.get_by_text("Logged in as")).to_be_visible()

    # Same site, other origin (another port): the cookie goes along, the CSRF token cannot.
    await page.goto(f"http://127.0.0.1:{evil_server.port}/")
    await page.locator("#go").click()
    await expect(page.get_by_role("heading", name="Request refused")).to_be_visible()
    await expect(page.locator("main")).to_contain_text("CSRF check failed")

    # Another site (localhost is not 127.0.0.1): SameSite=Lax keeps the cookie home, so the
    # POST finds no session and is sent to the login page (which, as a top-level GET, does
    # see the cookie and moves on to the dashboard). Nothing is created either way.
    await page.goto(f"http://localhost:{evil_server.port}/")
    await page.locator("#go").click()
    await page.wait_for_url(re.compile(r"/_gateway/(login\?.*)?$"))
    await expect(page.locator("#new-key")).to_have_count(0)

    assert len(await gw.services.identities.list_keys("carol")) == 1  # only the first key
    # Still logged in: the refusals did not end the session.
    await page.goto(str(gw.url / "_gateway/"))
    await expect(page.get_by_text("Logged in as")).to_contain_text("carol")
    await ctx.close()
