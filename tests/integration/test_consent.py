"""The consent flow end to end: browser, gateway, fake authorization server, store."""

from __future__ import annotations

import re
from typing import Any

from yarl import URL

from tests.fakes.authserver import DEFAULT_CLIENT_SECRET
from tests.integration.conftest import Gateway

PW = "correct horse battery"


async def _connections(gw: Gateway) -> list[Any]:
    return list(await gw.services.store.list_connections())


async def test_connect_from_dashboard_then_proxy_uses_the_token(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(require_pkce=True)
    key = await gw.identity("alice", PW)
    done = await gw.connect("alice", PW)
    assert done.status == 200, await done.text()
    assert "fake connected" in await done.text()
    [conn] = await _connections(gw)
    assert conn.status == "active" and conn.provider == "fake"
    # The exchange used PKCE and the exact redirect_uri (the fake enforces both).
    token_req = [r for r in gw.auth.requests if r.endpoint == "token"][-1]
    assert token_req.params["code_verifier"]
    assert token_req.params["redirect_uri"] == f"{gw.url}/_gateway/callback"

    async with gw.client() as c:
        resp = await c.get(gw.url / "fake/v1/things", params={"a": "1"},
                           headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200, await resp.text()
    seen = gw.upstream.requests[-1]
    assert seen.raw_path == "/api/v1/things?a=1"
    scheme, _, token = (seen.header("Authorization") or "").partition(" ")
    assert scheme == "Bearer" and gw.auth.is_valid_access_token(token) == "alice"
    assert key not in repr(seen.headers)


async def test_proxy_without_connection_answers_consent_required_with_a_link(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    key = await gw.identity("bob", PW)
    async with gw.client() as c:
        resp = await c.get(gw.url / "fake/x", headers={"Authorization": f"Bearer {key}"})
        body = await resp.json()
    assert resp.status == 401 and resp.headers["Gateway-Error"] == "consent_required"
    assert body["error"] == "consent_required" and body["provider"] == "fake"
    assert body["connect_url"].startswith(f"{gw.url}/_gateway/connect/fake?link=")
    assert gw.upstream.requests == []


async def test_connect_link_needs_login_as_that_identity_then_confirmation(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    key = await gw.identity("carol", PW)
    await gw.identity("mallory", PW)
    async with gw.client() as c:
        r = await c.post(gw.url / "_gateway/api/connect/fake", headers={"Authorization": f"Bearer {key}"})
        offer = await r.json()
    assert r.status == 200 and offer["expires_at"] > gw.clock()
    link = offer["connect_url"]

    # Not logged in: sent to the login page, which resumes at the link afterwards.
    browser = gw.client()
    first = await browser.get(link, allow_redirects=False)
    assert first.status == 302 and first.headers["Location"].startswith("/_gateway/login?next=")
    nxt = URL(first.headers["Location"]).query["next"]

    # Logged in as someone else: refused, nothing starts.
    other = gw.client()
    await gw.login(other, "mallory", PW)
    wrong = await other.get(link, allow_redirects=False)
    assert wrong.status == 403

    login = await gw.login(browser, "carol", PW, next_url=nxt)
    assert login.status == 303 and login.headers["Location"] == nxt
    page = await browser.get(gw.url.join(URL(nxt)), allow_redirects=False)
    html = await page.text()
    assert page.status == 200 and "carol" in html and "fake" in html
    csrf = re.search(r'name="csrf" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]
    token = re.search(r'name="link" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]

    forged = await browser.post(gw.url / "_gateway/connect/fake", data={"link": token},
                                allow_redirects=False)
    assert forged.status == 403 and gw.auth.hits["authorize"] == 0

    go = await browser.post(gw.url / "_gateway/connect/fake", data={"link": token, "csrf": csrf},
                            allow_redirects=False)
    assert go.status == 302 and go.headers["Location"].startswith(str(gw.auth.url / "authorize"))
    done = await gw.follow_to_callback(browser, go.headers["Location"])
    assert done.status == 200
    [conn] = await _connections(gw)
    assert (await gw.services.store.get_identity_by_id(conn.identity_id)).name == "carol"  # type: ignore[union-attr]

    again = await browser.post(gw.url / "_gateway/connect/fake", data={"link": token, "csrf": csrf},
                               allow_redirects=False)
    assert again.status == 400 and "already used" in await again.text()


async def test_without_require_login_the_link_alone_starts_the_flow(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(config={"consent": {"require_login": False}})
    key = await gw.identity("dave")
    async with gw.client() as c:
        offer = await (await c.post(gw.url / "_gateway/api/connect/fake",
                                    headers={"Authorization": f"Bearer {key}"})).json()
    browser = gw.client()
    go = await browser.get(offer["connect_url"], allow_redirects=False)
    assert go.status == 302 and go.headers["Location"].startswith(str(gw.auth.url))
    done = await gw.follow_to_callback(browser, go.headers["Location"])
    assert done.status == 200
    assert len(await _connections(gw)) == 1
    replay = await browser.get(offer["connect_url"], allow_redirects=False)
    assert replay.status == 400


async def test_callback_state_is_single_use_and_bound_to_the_browser(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("erin", PW)
    browser = gw.client()
    await gw.login(browser, "erin", PW)
    start = await browser.get(gw.url / "_gateway/connect/fake", allow_redirects=False)
    at_provider = await browser.get(start.headers["Location"], allow_redirects=False)
    callback = at_provider.headers["Location"]

    # Another browser (an attacker handing the URL to a victim) cannot complete it.
    stranger = gw.client()
    foreign = await stranger.get(callback, allow_redirects=False)
    assert foreign.status == 400 and await _connections(gw) == []

    ok = await browser.get(callback, allow_redirects=False)
    assert ok.status == 200
    replay = await browser.get(callback, allow_redirects=False)
    assert replay.status == 400
    assert len(await _connections(gw)) == 1


async def test_unknown_state_and_garbage_callbacks_store_nothing(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    async with gw.client() as c:
        for q in ({}, {"state": "nope", "code": "x"}, {"code": "x"}, {"state": "a" * 5000},
                  {"error": "access_denied"}):
            r = await c.get(gw.url / "_gateway/callback", params=q)
            assert r.status == 400, q
            assert r.headers["Gateway-Error"] == "bad_request"
    assert await _connections(gw) == []
    assert gw.auth.hits["token"] == 0


async def test_pending_authorization_expires(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("frank", PW)
    browser = gw.client()
    await gw.login(browser, "frank", PW)
    start = await browser.get(gw.url / "_gateway/connect/fake", allow_redirects=False)
    at_provider = await browser.get(start.headers["Location"], allow_redirects=False)
    gw.clock.advance(601)
    late = await browser.get(at_provider.headers["Location"], allow_redirects=False)
    assert late.status == 400 and await _connections(gw) == []


async def test_denied_consent_and_failed_exchange_are_clear_pages(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("gina", PW)
    gw.auth.deny = True
    denied = await gw.connect("gina", PW)
    assert denied.status == 400 and "declined" in await denied.text()
    gw.auth.deny = False
    gw.auth.fail_next(1, status=400, body=b'{"error": "invalid_grant"}',
                      content_type="application/json")
    failed = await gw.connect("gina", PW)
    text = await failed.text()
    assert failed.status == 502 and "invalid_grant" in text
    assert DEFAULT_CLIENT_SECRET not in text
    gw.auth.fail_next(1, status=503, body=b"<html>down</html>", content_type="text/html")
    unavailable = await gw.connect("gina", PW)
    assert unavailable.status == 503
    assert await _connections(gw) == []


async def test_reconnecting_replaces_tokens(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("hank", PW)
    assert (await gw.connect("hank", PW)).status == 200
    [first] = await _connections(gw)
    assert (await gw.connect("hank", PW)).status == 200
    [second] = await _connections(gw)
    assert second.version > first.version
    assert second.tokens.access_token != first.tokens.access_token


async def test_return_to_only_to_allowlisted_origins(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(config={"consent": {"return_to_origins": ["https://app.example"]}})
    await gw.identity("ivy", PW)
    browser = gw.client()
    await gw.login(browser, "ivy", PW)
    evil = await browser.get(gw.url / "_gateway/connect/fake",
                             params={"return_to": "https://evil.example/x"}, allow_redirects=False)
    assert evil.status == 400 and gw.auth.hits["authorize"] == 0
    good = await browser.get(gw.url / "_gateway/connect/fake",
                             params={"return_to": "https://app.example/done"}, allow_redirects=False)
    done = await gw.follow_to_callback(browser, good.headers["Location"])
    assert done.status == 303 and done.headers["Location"] == "https://app.example/done"


async def test_api_connect_needs_a_key_and_a_known_provider(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    key = await gw.identity("jack")
    async with gw.client() as c:
        r = await c.post(gw.url / "_gateway/api/connect/fake")
        assert r.status == 401 and r.headers["Gateway-Error"] == "unauthenticated"
        r = await c.post(gw.url / "_gateway/api/connect/nope", headers={"Authorization": f"Bearer {key}"})
        assert r.status == 404 and (await r.json())["error"] == "unknown_provider"
