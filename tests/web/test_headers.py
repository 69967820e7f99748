"""Every response the gateway itself serves under /_gateway/ carries the security headers;
proxied responses do not get them (they pass through unchanged)."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from yarl import URL

from tests.integration.conftest import Gateway
from tests.web.conftest import PW, csrf_of, logged_in, seed_connection

PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def assert_page_headers(resp: aiohttp.ClientResponse, gw: Gateway) -> None:
    where = f"{resp.method} {resp.url.path} -> {resp.status}"
    for name, value in PAGE_HEADERS.items():
        assert resp.headers.get(name) == value, (where, name, resp.headers.get(name))
    csp = resp.headers.get("Content-Security-Policy", "")
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["default-src"] == ["'none'"], where
    assert directives["frame-ancestors"] == ["'none'"], where
    assert directives["base-uri"] == ["'none'"], where
    assert "script-src" not in directives, where  # default-src 'none': no script at all
    assert directives["style-src"] == ["'self'"], where  # no inline style either
    # Forms may lead to the gateway itself and to the providers' authorize endpoints only.
    assert directives["form-action"] == ["'self'", str(gw.auth.url.origin())], where
    assert "unsafe" not in csp, where


def assert_no_inline_code(html: str) -> None:
    """The CSP would block these; the pages must not rely on them."""
    assert "<script" not in html.lower()
    assert not re.search(r"\sstyle=", html, re.I)
    assert not re.search(r"\son[a-z]+=", html, re.I)  # onclick= and friends


async def test_every_page_carries_the_security_headers(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(config={"providers": {"broken": {"upstream": "http://x"}}})
    key = await gw.identity("alice", PW)
    await seed_connection(gw, "alice")
    anon = gw.client()
    seen: list[aiohttp.ClientResponse] = []

    async def get(client: aiohttp.ClientSession, path: str, **kw: Any) -> str:
        resp = await client.get(gw.url.join(URL(path)), allow_redirects=False, **kw)
        seen.append(resp)
        return await resp.text()

    async def post(client: aiohttp.ClientSession, path: str, **kw: Any) -> str:
        resp = await client.post(gw.url.join(URL(path)), allow_redirects=False, **kw)
        seen.append(resp)
        return await resp.text()

    login_html = await get(anon, "/_gateway/login")
    await post(anon, "/_gateway/login", data={"name": "alice", "password": PW})  # 403: no csrf
    await post(anon, "/_gateway/login", data={"csrf": csrf_of(login_html), "name": "alice",
                                              "password": "wrong"})  # 401
    await get(anon, "/_gateway/")  # redirect to login
    await get(anon, "/_gateway/callback?state=nope&code=x")  # message page, 400
    await get(anon, "/_gateway/nowhere")  # the app's 404 (JSON)
    await post(anon, "/_gateway/api/connect/fake")  # 401 JSON
    await anon.put(gw.url / "_gateway/login")  # the router's 405

    browser = await logged_in(gw, "alice", create=False)
    dash = await get(browser, "/_gateway/")
    assert_no_inline_code(dash)
    await get(browser, "/_gateway/login")  # already logged in: 303 on
    await get(browser, "/_gateway/logout")  # confirmation page
    await get(browser, "/_gateway/connect/broken")  # not usable: message page
    await post(browser, "/_gateway/keys", data={"csrf": "forged"})  # 403 message page
    created = await post(browser, "/_gateway/keys", data={"csrf": csrf_of(dash)})  # shows a key
    assert "gwk_" in created and seen[-1].status == 200
    async with aiohttp.ClientSession() as c:
        offer = await (await c.post(gw.url / "_gateway/api/connect/fake",
                                    headers={"Authorization": f"Bearer {key}"})).json()
    confirm = await get(browser, offer["connect_url"])
    assert "Connect fake?" in confirm and seen[-1].status == 200
    assert_no_inline_code(confirm)
    await post(browser, "/_gateway/connect/fake", data={"csrf": csrf_of(dash)})  # to provider

    statuses = {r.status for r in seen}
    assert {200, 302, 303, 400, 401, 403, 404}.issubset(statuses), statuses
    for resp in seen:
        assert_page_headers(resp, gw)


async def test_the_405_and_error_pages_too(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    async with gw.client() as c:
        for method, path in (("PUT", "_gateway/login"), ("DELETE", "_gateway/keys"),
                             ("GET", "_gateway/static/missing.css")):
            resp = await c.request(method, gw.url / path, allow_redirects=False)
            assert resp.status in (404, 405), (method, path, resp.status)
            assert_page_headers(resp, gw)


async def test_static_files_are_cacheable_and_typed(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    async with gw.client() as c:
        css = await c.get(gw.url / "_gateway/static/gateway.css")
        assert css.status == 200 and css.content_type == "text/css"
        assert css.headers["X-Content-Type-Options"] == "nosniff"
        assert "max-age" in css.headers["Cache-Control"]
        logo = await c.get(gw.url / "_gateway/static/logo.svg")
        assert logo.status == 200 and logo.content_type == "image/svg+xml"


async def test_proxied_responses_are_left_alone(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    key = await gw.identity("bob", PW)
    await seed_connection(gw, "bob")
    async with gw.client() as c:
        resp = await c.get(gw.url / "fake/things", headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200
        for name in ("Content-Security-Policy", "X-Frame-Options", "Referrer-Policy",
                     "Cache-Control"):
            assert name not in resp.headers, name
