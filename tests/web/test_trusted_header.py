"""Trusted-header mode (``auth.trusted_header``): honoured only from ``auth.trusted_proxies``,
only for existing identities, and with CSRF protection like a cookie session."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import gateway.config
from gateway.web.sessions import BrowserSessions, TrustedHeader
from tests.integration.conftest import Gateway
from tests.web.conftest import PW, csrf_of, dashboard, logged_in

HEADER = "X-Remote-User"
needs_auth_config = pytest.mark.skipif(
    not hasattr(gateway.config, "AuthConfig"),
    reason="gateway.config has no AuthConfig yet (auth.trusted_header / auth.trusted_proxies); "
           "these tests run once the lead adds Config.auth")


def test_from_config_reads_auth_and_ignores_its_absence() -> None:
    assert TrustedHeader.from_config(SimpleNamespace()) is None
    assert TrustedHeader.from_config(SimpleNamespace(auth=SimpleNamespace(
        trusted_header=None, trusted_proxies=("10.0.0.0/8",)))) is None
    th = TrustedHeader.from_config(SimpleNamespace(auth=SimpleNamespace(
        trusted_header=HEADER, trusted_proxies=("10.0.0.0/8", "::1/128", "192.0.2.7"))))
    assert th is not None and th.header == HEADER
    assert ipaddress.ip_network("192.0.2.7/32") in th.networks


@pytest.mark.parametrize(("peer", "honoured"), [
    ("10.1.2.3", True), ("::1", True), ("::ffff:10.9.9.9", True), ("192.0.2.7", True),
    ("11.0.0.1", False), ("192.0.2.8", False), ("127.0.0.1", False), ("", False), (None, False),
    ("not-an-ip", False), ("fe80::1%eth0", False),
])
def test_honoured_only_from_trusted_networks(peer: str | None, honoured: bool) -> None:
    th = TrustedHeader(HEADER, tuple(ipaddress.ip_network(n) for n in
                                     ("10.0.0.0/8", "::1/128", "192.0.2.7/32")))
    assert th.honoured_from(peer) is honoured


def test_no_proxies_means_never() -> None:
    assert not TrustedHeader(HEADER, ()).honoured_from("127.0.0.1")


async def test_browser_sessions_honour_the_header_only_from_the_proxy(
        make_gateway: Any, aiohttp_server: Any) -> None:
    """BrowserSessions with an explicit TrustedHeader, on the gateway's real store (this runs
    before Config.auth exists; the app-level tests below run once it does)."""
    gw: Gateway = await make_gateway()
    await gw.identity("alice")
    trusted = TrustedHeader(HEADER, (ipaddress.ip_network("127.0.0.2/32"),))
    sessions = BrowserSessions(gw.services.store, secure=False, clock=gw.clock, trusted=trusted)

    async def whoami(request: web.Request) -> web.Response:
        current = await sessions.current(request)
        if current is None:
            return web.Response(status=401)
        return web.json_response({"name": current.identity.name, "via": current.via,
                                  "csrf": current.session.csrf_token})

    app = web.Application()
    app.router.add_get("/", whoami)
    server = await aiohttp_server(app, host="127.0.0.1")
    url = server.make_url("/")
    proxy, direct = _via(gw, "127.0.0.2"), _via(gw, "127.0.0.1")

    first = await (await proxy.get(url, headers={HEADER: "alice"})).json()
    assert first["name"] == "alice" and first["via"] == "header"
    again = await (await proxy.get(url, headers={HEADER: " alice "})).json()
    assert again["csrf"] == first["csrf"]  # a stable token for the forms, kept in the store
    assert (await direct.get(url, headers={HEADER: "alice"})).status == 401
    assert (await proxy.get(url, headers={HEADER: "nobody"})).status == 401
    assert (await proxy.get(url)).status == 401  # no header, no cookie
    gw.clock.advance(8 * 86400)  # past the absolute lifetime: a fresh token
    later = await (await proxy.get(url, headers={HEADER: "alice"})).json()
    assert later["name"] == "alice" and later["csrf"] != first["csrf"]


def _via(gw: Gateway, address: str) -> aiohttp.ClientSession:
    return gw.client(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def _gateway(make_gateway: Any, proxies: list[str]) -> Gateway:
    gw: Gateway = await make_gateway(config={"auth": {"trusted_header": HEADER,
                                                      "trusted_proxies": proxies}})
    return gw


@needs_auth_config
async def test_header_from_a_trusted_proxy_logs_in(make_gateway: Any) -> None:
    gw = await _gateway(make_gateway, ["127.0.0.2/32"])
    await gw.identity("alice")  # no password: SSO users need none
    proxy = _via(gw, "127.0.0.2")
    resp = await proxy.get(gw.url / "_gateway/", headers={HEADER: "alice"}, allow_redirects=False)
    html = await resp.text()
    assert resp.status == 200 and "Logged in as <strong>alice</strong>" in html
    assert "Log out</button>" not in html  # the SSO proxy owns logging out
    # Its forms carry a CSRF token that works, and a forged one is refused.
    token = csrf_of(html)
    forged = await proxy.post(gw.url / "_gateway/keys", headers={HEADER: "alice"},
                              data={"csrf": "forged"})
    assert forged.status == 403
    made = await proxy.post(gw.url / "_gateway/keys", headers={HEADER: "alice"},
                            data={"csrf": token})
    assert made.status == 200 and len(await gw.services.identities.list_keys("alice")) == 2
    # The login page sends an SSO user on.
    login = await proxy.get(gw.url / "_gateway/login", headers={HEADER: "alice"},
                            allow_redirects=False)
    assert login.status == 303


@needs_auth_config
async def test_header_from_anyone_else_is_ignored(make_gateway: Any) -> None:
    gw = await _gateway(make_gateway, ["127.0.0.2/32"])
    await gw.identity("alice")
    direct = _via(gw, "127.0.0.1")
    resp = await direct.get(gw.url / "_gateway/", headers={HEADER: "alice"},
                            allow_redirects=False)
    assert resp.status == 302
    # Nor does a forwarded-for header make a direct client look like the proxy.
    resp = await direct.get(gw.url / "_gateway/", allow_redirects=False, headers={
        HEADER: "alice", "X-Forwarded-For": "127.0.0.2", "Forwarded": "for=127.0.0.2"})
    assert resp.status == 302


@needs_auth_config
async def test_unknown_names_are_nobody_and_the_header_beats_a_cookie(make_gateway: Any) -> None:
    gw = await _gateway(make_gateway, ["127.0.0.0/8"])
    await gw.identity("bob")
    browser = await logged_in(gw, "mallory", PW)  # a cookie session of another identity
    status, _ = await dashboard(gw, browser)
    assert status == 200
    resp = await browser.get(gw.url / "_gateway/", headers={HEADER: "nobody"},
                             allow_redirects=False)
    assert resp.status == 302  # the proxy vouches for an unknown name: not mallory either
    resp = await browser.get(gw.url / "_gateway/", headers={HEADER: "bob"}, allow_redirects=False)
    assert resp.status == 200 and "Logged in as <strong>bob</strong>" in await resp.text()
    for bad in ("", " ", "a" * 200, "bob smith"):
        resp = await browser.get(gw.url / "_gateway/", headers={HEADER: bad},
                                 allow_redirects=False)
        assert resp.status in (302, 400), repr(bad)


@needs_auth_config
async def test_without_the_header_password_login_still_works(make_gateway: Any) -> None:
    gw = await _gateway(make_gateway, ["127.0.0.0/8"])
    browser = await logged_in(gw, "carol", PW)
    status, html = await dashboard(gw, browser)
    assert status == 200 and "carol" in html and "Log out</button>" in html
