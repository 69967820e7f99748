"""Login sessions: cookie flags, a new id at login, server-side logout, idle and absolute
expiry, and sessions that live in the store (another instance, or a restart, accepts them)."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie
from typing import Any

from gateway.web.sessions import SESSION_COOKIE
from tests.integration.conftest import Gateway
from tests.web.conftest import (
    PW,
    cookie_headers,
    csrf_of,
    dashboard,
    location,
    logged_in,
)


def _sid(gw: Gateway, browser: Any) -> str:
    for c in browser.cookie_jar:
        if c.key == SESSION_COOKIE:
            return str(c.value)
    raise AssertionError("no session cookie")


def _attrs(set_cookie: str) -> dict[str, str]:
    morsel = next(iter(SimpleCookie(set_cookie).values()))
    flags = {k.lower(): str(v) for k, v in morsel.items() if v}
    return flags


async def test_cookie_flags_over_http(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("alice", PW)
    browser = gw.client()
    resp = await gw.login(browser, "alice", PW)
    [line] = cookie_headers(resp, SESSION_COOKIE)
    attrs = _attrs(line)
    assert attrs.get("httponly") == "True" and attrs.get("samesite") == "Lax"
    assert attrs.get("path") == "/_gateway/"
    assert "secure" not in attrs  # public_url is http: a Secure cookie would never come back
    assert re.fullmatch(r"gateway_session=[A-Za-z0-9_-]{43};.*", line)


async def test_cookie_flags_when_public_url_is_https(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(
        config={"server": {"public_url": "https://gateway.example"}})
    await gw.identity("alice", PW)
    browser = gw.client()
    page = await browser.get(gw.url / "_gateway/login")
    [csrf_cookie] = cookie_headers(page, "gateway_login_csrf")
    assert _attrs(csrf_cookie).get("secure") == "True"
    assert _attrs(csrf_cookie).get("samesite") == "Strict"
    # The jar keeps Secure cookies away from http://, so send the double-submit pair by hand.
    token = csrf_of(await page.text())
    resp = await browser.post(gw.url / "_gateway/login", allow_redirects=False,
                              data={"csrf": token, "name": "alice", "password": PW},
                              headers={"Cookie": f"gateway_login_csrf={token}"})
    assert resp.status == 303
    [line] = cookie_headers(resp, SESSION_COOKIE)
    attrs = _attrs(line)
    assert attrs.get("secure") == "True" and attrs.get("httponly") == "True"
    assert attrs.get("samesite") == "Lax"


async def test_login_gives_a_new_session_id_and_kills_a_planted_one(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("victim", PW)
    attacker = await logged_in(gw, "attacker")
    planted = _sid(gw, attacker)

    # The victim's browser carries the attacker's session id (fixation), then logs in.
    victim = gw.client()
    page = await victim.get(gw.url / "_gateway/login")
    victim.cookie_jar.update_cookies({SESSION_COOKIE: planted}, gw.url / "_gateway/")
    resp = await victim.post(gw.url / "_gateway/login", allow_redirects=False, data={
        "csrf": csrf_of(await page.text()), "name": "victim", "password": PW})
    assert resp.status == 303
    fresh = _sid(gw, victim)
    assert fresh != planted
    status, html = await dashboard(gw, victim)
    assert status == 200 and "victim" in html
    # The planted id no longer logs anyone in: the attacker is not riding the victim's login.
    status, _ = await dashboard(gw, attacker)
    assert status == 302


async def test_logout_needs_a_post_and_kills_the_session_server_side(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    browser = await logged_in(gw, "alice")
    sid = _sid(gw, browser)
    copy = gw.client()
    copy.cookie_jar.update_cookies({SESSION_COOKIE: sid}, gw.url / "_gateway/")
    assert (await dashboard(gw, copy))[0] == 200

    # A link or prefetch (GET) only asks.
    ask = await browser.get(gw.url / "_gateway/logout", allow_redirects=False)
    html = await ask.text()
    assert ask.status == 200 and "Log out?" in html
    assert (await dashboard(gw, copy))[0] == 200

    out = await browser.post(gw.url / "_gateway/logout", data={"csrf": csrf_of(html)},
                             allow_redirects=False)
    assert out.status == 303 and location(out) == "/_gateway/login?logged_out=1"
    [line] = cookie_headers(out, SESSION_COOKIE)
    assert "Max-Age=0" in line or "expires" in line.lower()
    # The copied cookie (never cleared in that other jar) is dead too: the store forgot it.
    assert (await dashboard(gw, copy))[0] == 302
    assert (await dashboard(gw, browser))[0] == 302
    page = await browser.get(gw.url / "_gateway/login", params={"logged_out": "1"})
    assert "You are logged out." in await page.text()


async def test_idle_expiry_and_activity_keeps_it_alive(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    browser = await logged_in(gw, "alice")
    gw.clock.advance(7 * 3600)
    assert (await dashboard(gw, browser))[0] == 200  # used within the idle period
    gw.clock.advance(7 * 3600)  # 14 h after login, 7 h after last use
    assert (await dashboard(gw, browser))[0] == 200
    gw.clock.advance(8 * 3600 + 1)
    status, _ = await dashboard(gw, browser)
    assert status == 302  # idle for more than 8 h


async def test_absolute_expiry_even_when_active(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    browser = await logged_in(gw, "alice")
    for _ in range(7 * 24 // 6):  # every 6 h for a week
        assert (await dashboard(gw, browser))[0] == 200
        gw.clock.advance(6 * 3600)
    resp = await browser.get(gw.url / "_gateway/", allow_redirects=False)
    assert resp.status == 302 and location(resp).startswith("/_gateway/login?next=")


async def test_sessions_live_in_the_store_across_instances(make_gateway: Any) -> None:
    first: Gateway = await make_gateway()
    browser = await logged_in(first, "alice")
    sid = _sid(first, browser)
    # A second instance on the same database and key (as after a restart, or behind a
    # load balancer) accepts the cookie.
    second: Gateway = await make_gateway()
    second.clock.now = first.clock.now
    other = second.client()
    other.cookie_jar.update_cookies({SESSION_COOKIE: sid}, second.url / "_gateway/")
    status, html = await dashboard(second, other)
    assert status == 200 and "alice" in html
    # Only a hash of the id is stored.
    db = first.config.store.path
    assert db is not None and sid.encode() not in db.read_bytes()


async def test_bad_cookies_are_nobody(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await logged_in(gw, "alice")
    for value in ("", "x", "A" * 43, "A" * 500, "../../etc", "%00"):
        c = gw.client()
        c.cookie_jar.update_cookies({SESSION_COOKIE: value}, gw.url / "_gateway/")
        assert (await dashboard(gw, c))[0] == 302, value
