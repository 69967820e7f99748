"""Quirks through the whole gateway: browser consent, the real store and token manager, the
proxy, a quirky fake authorization server and fake upstreams. The clock the gateway reads
is the test's; the fake servers keep real time."""

from __future__ import annotations

from typing import Any

from tests.fakes.authserver import FakeAuthServer
from tests.fakes.upstream import start_upstream
from tests.quirks.conftest import Gateway, TlsUpstream, ValidTokens, bearer, call, connected


async def test_slack_style_nested_user_token_then_a_flat_refresh(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(provider={
        "token_response_path": "authed_user", "scope_param": "user_scope",
        "scope_separator": ",", "scopes": ["users:read", "chat:write"]}, expires_in=43200)
    gw.auth.nest_tokens_under, gw.auth.token_type = "authed_user", "user"
    gw.auth.scope_param, gw.auth.scope_separator = "user_scope", ","
    key = await connected(gw)
    [conn] = await gw.services.store.list_connections()
    assert conn.tokens.scopes == ("users:read", "chat:write")
    r = await call(gw, key, "/fake/conversations.list?limit=1")
    assert r.status == 200
    first = bearer(gw.upstream.requests[-1].headers)
    assert gw.auth.is_valid_access_token(first) == "alice"  # the user's, not the decoy bot's
    gw.clock.advance(43200)  # expired: the refresh answer is flat (token_type "user")
    r = await call(gw, key, "/fake/conversations.list")
    assert r.status == 200 and gw.auth.grants["refresh_token"] == 1
    second = bearer(gw.upstream.requests[-1].headers)
    assert second != first and gw.auth.is_valid_access_token(second) == "alice"


async def test_never_expires_uses_the_token_until_the_upstream_says_401(make_gateway: Any
                                                                        ) -> None:
    gw: Gateway = await make_gateway(provider={"never_expires": True}, expires_in=None)
    gw.upstream.accepted_tokens = ValidTokens(gw.auth)
    key = await connected(gw)
    assert (await call(gw, key, "/fake/protected")).status == 200
    gw.clock.advance(30 * 86400)
    assert (await call(gw, key, "/fake/protected")).status == 200
    assert gw.auth.hits["token"] == 1  # the code exchange only: no refresh by the clock
    gw.auth.expire_access_tokens()  # the session ended at the provider
    r = await call(gw, key, "/fake/protected")
    assert r.status == 200 and gw.auth.grants["refresh_token"] == 1
    assert [x.raw_path for x in gw.upstream.requests][-2:] == ["/api/protected"] * 2


async def test_without_never_expires_an_unstated_lifetime_is_refreshed_in_time(
        make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(expires_in=None)
    key = await connected(gw)
    gw.clock.advance(3600)
    assert (await call(gw, key, "/fake/x")).status == 200
    assert gw.auth.grants["refresh_token"] == 1


async def test_never_expiring_token_without_refresh_token(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(provider={"never_expires": True}, expires_in=None,
                                     issue_refresh_tokens=False)
    gw.upstream.accepted_tokens = ValidTokens(gw.auth)
    key = await connected(gw)
    gw.clock.advance(400 * 86400)
    assert (await call(gw, key, "/fake/protected")).status == 200
    assert gw.auth.hits["token"] == 1
    gw.auth.revoke_user("alice")  # revoked at the provider: nothing to refresh with
    r = await call(gw, key, "/fake/protected")
    assert r.status == 401 and r.headers["Gateway-Error"] == "reconsent_required"


async def test_upstream_from_token(make_gateway: Any, fake: FakeAuthServer,
                                   tls_upstream: TlsUpstream) -> None:
    # Provider "sf" (Salesforce-like: no fixed upstream) authorizes at ``fake``.
    gw: Gateway = await make_gateway(config={"providers": {"sf": fake.config_entry(
        upstream_from_token="instance_url", never_expires=True)}})
    fake.expires_in = None
    fake.extra_token_fields = {"instance_url": str(tls_upstream.url / "sf")}
    tls_upstream.fake.accepted_tokens = ValidTokens(fake)
    key = await connected(gw, provider="sf")
    r = await call(gw, key, "/sf/services/data/v60.0/query?q=SELECT+Id+FROM+Account")
    assert r.status == 200
    [seen] = tls_upstream.fake.requests
    assert seen.raw_path == "/sf/services/data/v60.0/query?q=SELECT+Id+FROM+Account"
    assert fake.is_valid_access_token(bearer(seen.headers)) == "alice"
    # The session ends; the refresh answer names another instance: traffic follows it.
    fake.extra_token_fields = {"instance_url": str(tls_upstream.url / "eu7")}
    fake.expire_access_tokens()
    r = await call(gw, key, "/sf/services/data/v60.0/protected")
    assert r.status == 200 and fake.grants["refresh_token"] == 1
    assert [x.raw_path for x in tls_upstream.fake.requests][1:] == [
        "/sf/services/data/v60.0/protected", "/eu7/services/data/v60.0/protected"]
    assert gw.upstream.requests == []


async def test_instance_url_is_ignored_without_the_quirk(make_gateway: Any,
                                                         tls_upstream: TlsUpstream) -> None:
    gw: Gateway = await make_gateway()
    gw.auth.extra_token_fields = {"instance_url": str(tls_upstream.url / "evil")}
    key = await connected(gw)
    assert (await call(gw, key, "/fake/v1/x")).status == 200
    assert [x.raw_path for x in gw.upstream.requests] == ["/api/v1/x"]
    assert tls_upstream.fake.requests == []


async def test_an_unusable_token_base_is_a_502(make_gateway: Any, fake: FakeAuthServer) -> None:
    gw: Gateway = await make_gateway(config={"providers": {"sf": fake.config_entry(
        upstream_from_token="instance_url")}})
    fake.extra_token_fields = {"instance_url": str(gw.upstream.url / "plain-http")}
    key = await connected(gw, provider="sf")
    r = await call(gw, key, "/sf/x")
    assert r.status == 502 and r.headers["Gateway-Error"] == "upstream_unreachable"
    assert gw.upstream.requests == []


async def test_several_upstreams(make_gateway: Any, aiohttp_server: Any) -> None:
    mail, drive = await start_upstream(aiohttp_server), await start_upstream(aiohttp_server)
    gw: Gateway = await make_gateway(provider={"upstreams": {
        "mail": str(mail.url / "gmail"), "drive": str(drive.url / "drive")}})
    key = await connected(gw)
    assert (await call(gw, key, "/fake/mail/v1/users/me/messages?q=a%20b")).status == 200
    assert (await call(gw, key, "/fake/drive/v3/files")).status == 200
    assert (await call(gw, key, "/fake/calendar/v3")).status == 200
    assert [r.raw_path for r in mail.requests] == ["/gmail/v1/users/me/messages?q=a%20b"]
    assert [r.raw_path for r in drive.requests] == ["/drive/v3/files"]
    assert [r.raw_path for r in gw.upstream.requests] == ["/api/calendar/v3"]
    token = bearer(mail.requests[0].headers)
    assert bearer(drive.requests[0].headers) == token == bearer(gw.upstream.requests[0].headers)
    # A redirect within a named base comes back under that name.
    r = await call(gw, key, f"/fake/mail/redirect?to={mail.url}/gmail/v1/landing")
    assert r.status == 302 and r.headers["Location"] == f"{gw.url}/fake/mail/v1/landing"


async def test_unknown_upstream_without_a_default(make_gateway: Any, fake: FakeAuthServer,
                                                  aiohttp_server: Any) -> None:
    mail = await start_upstream(aiohttp_server)
    gw: Gateway = await make_gateway(config={"providers": {"g": fake.config_entry(
        upstreams={"mail": str(mail.url / "m")})}})
    key = await gw.identity("alice")  # not even connected: the path is wrong first
    r = await call(gw, key, "/g/calendar/v3")
    body = await r.json()
    assert r.status == 404 and r.headers["Gateway-Error"] == "unknown_upstream"
    assert body["upstreams"] == ["mail"] and "mail" in body["message"]
    assert mail.requests == [] and fake.hits["token"] == 0
    r = await call(gw, key, "/g/mail/x")
    assert r.status == 401 and r.headers["Gateway-Error"] == "consent_required"


async def test_upstream_auth_scheme(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(provider={"upstream_auth_scheme": "OAuth"})
    key = await connected(gw)
    assert (await call(gw, key, "/fake/me")).status == 200
    scheme, _, token = (gw.upstream.requests[-1].header("Authorization") or "").partition(" ")
    assert scheme == "OAuth" and gw.auth.is_valid_access_token(token) == "alice"
