"""Forged form posts (no CSRF token, or a wrong one) are refused with 403 and change nothing;
``next`` never leads off the gateway."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.web.console import safe_next
from tests.integration.conftest import Gateway
from tests.web.conftest import PW, csrf_of, dashboard, location, logged_in, seed_connection

FORMS = [
    ("/_gateway/logout", {}),
    ("/_gateway/disconnect/fake", {}),
    ("/_gateway/keys", {}),
    ("/_gateway/keys/revoke", {"prefix": "PREFIX"}),
    ("/_gateway/connect/fake", {}),
]


async def _state(gw: Gateway, name: str) -> tuple[Any, ...]:
    identity = await gw.services.store.get_identity(name)
    assert identity is not None
    keys = await gw.services.store.list_api_keys(identity.id)
    conns = await gw.services.store.list_connections(identity.id)
    return (tuple((k.prefix, k.revoked_at) for k in keys),
            tuple((c.provider, c.version, c.status) for c in conns))


@pytest.mark.parametrize("token", [None, "", "forged-token"])
async def test_forged_posts_are_refused_and_change_nothing(make_gateway: Any,
                                                           token: str | None) -> None:
    gw: Gateway = await make_gateway()
    browser = await logged_in(gw, "alice")
    await seed_connection(gw, "alice")
    [key] = await gw.services.identities.list_keys("alice")
    before = await _state(gw, "alice")
    hits = dict(gw.auth.hits)
    for path, fields in FORMS:
        data = {k: (key.prefix if v == "PREFIX" else v) for k, v in fields.items()}
        if token is not None:
            data["csrf"] = token
        resp = await browser.post(gw.url.join(URL(path)), data=data, allow_redirects=False)
        assert resp.status == 403, (path, resp.status)
        assert resp.headers["Gateway-Error"] == "csrf_failed", path
        assert "CSRF" in await resp.text()
    assert await _state(gw, "alice") == before
    assert dict(gw.auth.hits) == hits  # no authorize, token or revoke request went out
    assert (await dashboard(gw, browser))[0] == 200  # still logged in


async def test_another_sessions_token_does_not_work(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    victim = await logged_in(gw, "alice")
    attacker = await logged_in(gw, "mallory")
    attackers_token = csrf_of((await dashboard(gw, attacker))[1])
    before = await _state(gw, "alice")
    resp = await victim.post(gw.url / "_gateway/keys", data={"csrf": attackers_token})
    assert resp.status == 403 and await _state(gw, "alice") == before


async def test_the_real_token_works(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    browser = await logged_in(gw, "alice")
    await seed_connection(gw, "alice")
    token = csrf_of((await dashboard(gw, browser))[1])
    created = await browser.post(gw.url / "_gateway/keys", data={"csrf": token})
    assert created.status == 200
    assert len(await gw.services.identities.list_keys("alice")) == 2
    gone = await browser.post(gw.url / "_gateway/disconnect/fake", data={"csrf": token})
    assert gone.status == 200 and "fake disconnected" in await gone.text()
    assert gw.auth.hits["revoke"] >= 1
    assert await gw.services.store.list_connections() == []


async def test_login_form_needs_its_double_submit_token(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("alice", PW)
    c = gw.client()
    page = await c.get(gw.url / "_gateway/login")
    token = csrf_of(await page.text())
    for data in ({"name": "alice", "password": PW},
                 {"name": "alice", "password": PW, "csrf": "forged"}):
        resp = await c.post(gw.url / "_gateway/login", data=data, allow_redirects=False)
        assert resp.status == 403 and not any(k.key == "gateway_session" for k in c.cookie_jar)
    # A cross-site form cannot send the cookie (SameSite=Strict), so the pair never matches.
    async with aiohttp.ClientSession() as bare:
        resp = await bare.post(gw.url / "_gateway/login", allow_redirects=False,
                               data={"name": "alice", "password": PW, "csrf": token})
        assert resp.status == 403
    ok = await c.post(gw.url / "_gateway/login", allow_redirects=False,
                      data={"name": "alice", "password": PW, "csrf": token})
    assert ok.status == 303


async def test_posts_without_a_session_go_to_login_and_change_nothing(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("alice", PW)
    await seed_connection(gw, "alice")
    before = await _state(gw, "alice")
    async with gw.client() as anon:
        for path, _ in FORMS[1:]:
            resp = await anon.post(gw.url.join(URL(path)), data={"csrf": "x"},
                                   allow_redirects=False)
            assert resp.status in (302, 303) and location(resp).startswith("/_gateway/login")
    assert await _state(gw, "alice") == before


EVIL_NEXT = [
    "https://evil.example/", "//evil.example/x", "/\\evil.example", "\\\\evil.example",
    "/_gateway//evil.example", "/_gateway/\\evil.example", "/_gateway/\\/evil.example",
    "javascript:alert(1)", "/_gateway/\r\nSet-Cookie: x=1", "/_gateway/\tx", "/other/path",
    "http:/evil.example", "/_gateway/@evil.example", " /_gateway/", "",
]


@pytest.mark.parametrize("target", EVIL_NEXT)
def test_safe_next_refuses(target: str) -> None:
    result = safe_next(target)
    stays = (result.startswith("/_gateway/") and URL(result).host is None
             and "//" not in result and "\\" not in result
             and not any(ord(ch) < 0x21 for ch in result))
    assert stays, (target, result)


def test_safe_next_keeps_gateway_paths() -> None:
    for ok in ("/_gateway/", "/_gateway/connect/fake?link=abc.def_-&return_to=%2F_gateway%2F"):
        assert safe_next(ok) == ok


async def test_no_open_redirect_through_login(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("alice", PW)
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example",
                   "/_gateway//evil.example"):
        c = gw.client()
        page = await c.get(gw.url / "_gateway/login", params={"next": target})
        html = await page.text()
        assert "evil" not in html, target
        resp = await c.post(gw.url / "_gateway/login", allow_redirects=False, data={
            "csrf": csrf_of(html), "name": "alice", "password": PW, "next": target})
        assert resp.status == 303 and location(resp) == "/_gateway/", target
