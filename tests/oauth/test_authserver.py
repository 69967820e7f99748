"""The fake authorization server itself: other areas' tests rely on its strictness."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.oauth.protocol import authorize_url, new_pkce
from tests.fakes.authserver import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    FakeAuthServer,
    start_auth_server,
)
from tests.oauth.conftest import REDIRECT_URI, GetCode

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def basic(raw: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()}


# DEFAULT_CLIENT_SECRET form-encoded by hand (RFC 6749 §2.3.1), independent of protocol.py.
GOOD_BASIC = basic("gateway-test:s3cret%3A%2B+%25%2F%26%3D")


async def post_token(session: aiohttp.ClientSession, fake: FakeAuthServer,
                     form: dict[str, str], headers: dict[str, str] | None = None,
                     ) -> tuple[int, dict[str, Any]]:
    async with session.post(fake.url / "token", data=form, headers=headers) as resp:
        return resp.status, await resp.json()


async def authorize(session: aiohttp.ClientSession, fake: FakeAuthServer,
                    **params: str) -> aiohttp.ClientResponse:
    query = {"response_type": "code", "client_id": DEFAULT_CLIENT_ID,
             "redirect_uri": REDIRECT_URI, "state": "st", **params}
    query = {k: v for k, v in query.items() if v != "-"}
    async with session.get((fake.url / "authorize").with_query(query),
                           allow_redirects=False) as resp:
        await resp.read()
        return resp


async def test_discovery_documents(fake: FakeAuthServer, session: aiohttp.ClientSession) -> None:
    for path in (".well-known/openid-configuration", ".well-known/oauth-authorization-server"):
        async with session.get(fake.url / path) as resp:
            doc = await resp.json()
        assert doc["issuer"] == str(fake.url) == fake.issuer_url()
        assert doc["token_endpoint"] == str(fake.url / "token")
        assert doc["jwks_uri"] == str(fake.url / "jwks")
        assert doc["code_challenge_methods_supported"] == ["S256"]
    assert fake.hits["discovery"] == 2


@pytest.mark.parametrize(("params", "status", "error"), [
    ({"client_id": "nobody"}, 400, None),
    ({"redirect_uri": "-"}, 400, None),
    ({"redirect_uri": "not a uri"}, 400, None),
    ({"response_type": "token"}, 302, "unsupported_response_type"),
    ({"code_challenge": "x" * 43, "code_challenge_method": "plain"}, 302, "invalid_request"),
    ({"code_challenge_method": "S256"}, 302, "invalid_request"),
    ({"code_challenge": "short"}, 302, "invalid_request"),
])
async def test_authorize_rejections(fake: FakeAuthServer, session: aiohttp.ClientSession,
                                    params: dict[str, str], status: int,
                                    error: str | None) -> None:
    resp = await authorize(session, fake, **params)
    assert resp.status == status
    if error is not None:
        q = URL(resp.headers["Location"]).query
        assert (q["error"], q["state"]) == (error, "st") and "code" not in q
    assert not fake.codes


async def test_registered_redirect_uris_and_duplicates(fake: FakeAuthServer,
                                                       session: aiohttp.ClientSession) -> None:
    fake.add_client("strict", "sec", redirect_uris=["https://app.example/cb"])
    resp = await authorize(session, fake, client_id="strict")
    assert resp.status == 400  # REDIRECT_URI is not registered: no redirect (§4.1.2.1)
    resp = await authorize(session, fake, client_id="strict", redirect_uri="-")
    assert resp.status == 302 and resp.headers["Location"].startswith("https://app.example/cb?")
    url = str((fake.url / "authorize").with_query(
        [("response_type", "code"), ("client_id", DEFAULT_CLIENT_ID),
         ("redirect_uri", REDIRECT_URI), ("state", "a"), ("state", "b")]))
    async with session.get(url, allow_redirects=False) as r:
        assert r.status == 400


async def test_require_pkce_and_deny(fake: FakeAuthServer,
                                     session: aiohttp.ClientSession) -> None:
    fake.require_pkce = True
    q = URL((await authorize(session, fake)).headers["Location"]).query
    assert q["error"] == "invalid_request"
    fake.require_pkce, fake.deny = False, True
    q = URL((await authorize(session, fake)).headers["Location"]).query
    assert (q["error"], q["state"]) == ("access_denied", "st")


async def test_consent_form_round_trip(fake: FakeAuthServer, session: aiohttp.ClientSession,
                                       ) -> None:
    fake.auto_approve = False
    provider = fake.provider_config(scopes=("openid",))
    verifier, challenge = new_pkce()
    url = authorize_url(provider, redirect_uri=REDIRECT_URI, state="s1",
                        code_challenge=challenge, nonce="nn")
    async with session.get(url, allow_redirects=False) as resp:
        page = await resp.text()
    assert resp.status == 200 and 'id="approve"' in page and 'id="username"' in page
    assert 'name="code_challenge"' in page and not fake.codes
    form = dict(URL(url).query)
    async with session.post(fake.url / "authorize", allow_redirects=False,
                            data={**form, "username": "bob", "action": "approve"}) as resp:
        q = URL(resp.headers["Location"]).query
    assert resp.status == 302 and q["state"] == "s1"
    status, body = await post_token(session, fake, {
        "grant_type": "authorization_code", "code": q["code"], "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier}, GOOD_BASIC)
    assert status == 200 and fake.is_valid_access_token(body["access_token"]) == "bob"
    async with session.post(fake.url / "authorize", allow_redirects=False,
                            data={**form, "username": "bob", "action": "deny"}) as resp:
        assert URL(resp.headers["Location"]).query["error"] == "access_denied"


async def test_basic_auth_must_be_form_encoded(fake: FakeAuthServer,
                                               session: aiohttp.ClientSession) -> None:
    form = {"grant_type": "client_credentials"}
    status, body = await post_token(session, fake, form,
                                    basic(f"{DEFAULT_CLIENT_ID}:{DEFAULT_CLIENT_SECRET}"))
    assert (status, body["error"]) == (401, "invalid_client")  # raw secret, not encoded
    status, body = await post_token(session, fake, form, GOOD_BASIC)
    assert status == 200 and fake.is_valid_access_token(body["access_token"]) == DEFAULT_CLIENT_ID


@pytest.mark.parametrize(("form", "headers", "status", "error"), [
    ({"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}, None, 401,
     "invalid_client"),  # registered for Basic, tried post
    ({"client_id": DEFAULT_CLIENT_ID}, None, 401, "invalid_client"),
    ({"client_secret": "x"}, basic("gateway-test:x"), 400, "invalid_request"),
    ({}, {"Authorization": "Bearer abc"}, 401, "invalid_client"),
    ({}, basic("gateway-test"), 401, "invalid_client"),
])
async def test_client_auth_strictness(fake: FakeAuthServer, session: aiohttp.ClientSession,
                                      form: dict[str, str], headers: dict[str, str] | None,
                                      status: int, error: str) -> None:
    got = await post_token(session, fake, {"grant_type": "client_credentials", **form}, headers)
    assert (got[0], got[1]["error"]) == (status, error)
    assert not fake.access_tokens


async def test_token_endpoint_wants_a_form(fake: FakeAuthServer,
                                           session: aiohttp.ClientSession) -> None:
    async with session.post(fake.url / "token", json={"grant_type": "x"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    assert fake.hits["token"] == 1


async def test_code_expires(aiohttp_server: Any, session: aiohttp.ClientSession,
                            get_code: GetCode) -> None:
    clock = [1000.0]
    fake = await start_auth_server(aiohttp_server, clock=lambda: clock[0], code_ttl=30)
    code, verifier = await get_code(fake.provider_config())
    clock[0] += 31
    status, body = await post_token(session, fake, {
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier or ""}, GOOD_BASIC)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_refresh_grace_and_reuse_detection(aiohttp_server: Any,
                                                 session: aiohttp.ClientSession) -> None:
    clock = [1000.0]
    fake = await start_auth_server(aiohttp_server, clock=lambda: clock[0], refresh_grace=5)
    auth = GOOD_BASIC
    old = fake.issue_tokens("alice")["refresh_token"]
    form = {"grant_type": "refresh_token", "refresh_token": old}
    status, first = await post_token(session, fake, form, auth)
    assert status == 200 and first["refresh_token"] != old
    status, again = await post_token(session, fake, form, auth)  # within grace
    assert status == 200 and again["refresh_token"] == first["refresh_token"]
    clock[0] += 6
    status, body = await post_token(session, fake, form, auth)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert fake.is_valid_refresh_token(first["refresh_token"])  # no reuse detection
    fake.reuse_detection = True
    await post_token(session, fake, form, auth)
    assert fake.is_valid_refresh_token(first["refresh_token"]) is None


async def test_refresh_scope_cannot_widen(fake: FakeAuthServer,
                                          session: aiohttp.ClientSession) -> None:
    rt = fake.issue_tokens("alice", scopes=["a", "b"])["refresh_token"]
    auth = GOOD_BASIC
    status, body = await post_token(session, fake, {
        "grant_type": "refresh_token", "refresh_token": rt, "scope": "a c"}, auth)
    assert (status, body["error"]) == (400, "invalid_scope")
    status, body = await post_token(session, fake, {
        "grant_type": "refresh_token", "refresh_token": rt, "scope": "a"}, auth)
    assert status == 200 and body["scope"] == "a"


async def test_access_token_validity_helpers(fake: FakeAuthServer,
                                             session: aiohttp.ClientSession) -> None:
    body = fake.issue_tokens("carol")
    at = body["access_token"]
    async with session.get(fake.url / "userinfo", headers={"Authorization": f"Bearer {at}"}) as r:
        assert (await r.json())["sub"] == "carol"
    assert fake.expire_access_tokens("carol") == 1
    assert fake.is_valid_access_token(at) is None
    assert fake.is_valid_refresh_token(body["refresh_token"]) == "carol"
    async with session.get(fake.url / "userinfo", headers={"Authorization": f"Bearer {at}"}) as r:
        assert r.status == 401
    assert fake.is_valid_access_token("made-up") is None
    fake.expires_in = None
    body = fake.issue_tokens("dave")
    assert "expires_in" not in body and fake.is_valid_access_token(body["access_token"]) == "dave"
    assert fake.revoke_token(body["access_token"]) and not fake.revoke_token("nope")
    assert fake.is_valid_access_token(body["access_token"]) is None


async def test_provider_config_and_config_entry(fake: FakeAuthServer) -> None:
    p = fake.provider_config("x", upstream=URL("http://up.example"))
    assert p.usable and p.token_url == fake.url / "token" and p.client_secret
    entry = fake.config_entry(scopes=["openid"])
    assert entry["client_secret"] == DEFAULT_CLIENT_SECRET and entry["scopes"] == ["openid"]
    fake.add_client("pub", auth_method="none")
    assert "client_secret" not in fake.config_entry(client_id="pub")
