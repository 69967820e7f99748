"""OAuthClient against the fake authorization server (and a few hostile servers)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.oauth.client import MAX_BODY, OAuthClient
from gateway.oauth.protocol import OAuthError, TokenGrant
from tests.fakes.authserver import FakeAuthServer
from tests.oauth.conftest import REDIRECT_URI, GetCode

NOW = time.time()


def grant_of(result: TokenGrant | OAuthError) -> TokenGrant:
    assert isinstance(result, TokenGrant), result
    return result


def error_of(result: TokenGrant | OAuthError | None) -> OAuthError:
    assert isinstance(result, OAuthError), result
    return result


# --------------------------------------------------------------------------- code exchange


@pytest.mark.parametrize(("method", "cid", "secret"), [
    ("client_secret_basic", "basic:client id+%", "p:a+s s%w&="),
    ("client_secret_post", "post-client", "p:a+s s%w&="),
    ("none", "public-client", None),
])
async def test_code_exchange_per_client_auth(fake: FakeAuthServer, oauth: OAuthClient,
                                             get_code: GetCode, method: str, cid: str,
                                             secret: str | None) -> None:
    fake.add_client(cid, secret, auth_method=method, redirect_uris=[REDIRECT_URI])
    provider = fake.provider_config(client_id=cid, scopes=("read", "write"))
    code, verifier = await get_code(provider)
    g = grant_of(await oauth.exchange_code(provider, code=code, redirect_uri=REDIRECT_URI,
                                           code_verifier=verifier, now=NOW))
    assert fake.is_valid_access_token(g.tokens.access_token) == "alice"
    assert g.tokens.refresh_token and fake.is_valid_refresh_token(g.tokens.refresh_token)
    assert g.tokens.scopes == ("read", "write")
    assert g.tokens.expires_at == pytest.approx(NOW + 3600)
    assert fake.grants["authorization_code"] == 1
    sent = fake.requests[-1]
    assert sent.headers["Accept"] == "application/json"
    assert ("Authorization" in sent.headers) == (method == "client_secret_basic")


async def test_wrong_secret_is_invalid_client_without_echo(fake: FakeAuthServer,
                                                           oauth: OAuthClient,
                                                           get_code: GetCode) -> None:
    provider = fake.provider_config()
    code, verifier = await get_code(provider)
    bad = fake.provider_config(client_secret="wrong-secret")
    e = error_of(await oauth.exchange_code(bad, code=code, redirect_uri=REDIRECT_URI,
                                           code_verifier=verifier, now=NOW))
    assert (e.error, e.status, e.transient) == ("invalid_client", 401, False)
    assert "wrong-secret" not in str(e) and code not in str(e)


@pytest.mark.parametrize("tamper", ["verifier", "no_verifier", "redirect_uri", "code"])
async def test_code_exchange_rejections(fake: FakeAuthServer, oauth: OAuthClient,
                                        get_code: GetCode, tamper: str) -> None:
    provider = fake.provider_config()
    code, verifier = await get_code(provider)
    kw: dict[str, Any] = {"code": code, "redirect_uri": REDIRECT_URI, "code_verifier": verifier}
    if tamper == "verifier":
        kw["code_verifier"] = "x" * 43
    elif tamper == "no_verifier":
        kw["code_verifier"] = None
    elif tamper == "redirect_uri":
        kw["redirect_uri"] = REDIRECT_URI + "/other"
    else:
        kw["code"] = code + "x"
    e = error_of(await oauth.exchange_code(provider, now=NOW, **kw))
    assert e.invalid_grant and not e.transient
    assert not fake.access_tokens


async def test_code_exchange_with_pkce_off(fake: FakeAuthServer, oauth: OAuthClient,
                                           get_code: GetCode) -> None:
    provider = fake.provider_config(pkce=False)
    code, verifier = await get_code(provider)  # a verifier is made, but never sent
    assert verifier and fake.requests[-1].params.get("code_challenge") is None
    grant_of(await oauth.exchange_code(provider, code=code, redirect_uri=REDIRECT_URI,
                                       code_verifier=verifier, now=NOW))


async def test_code_is_single_use_and_replay_revokes(fake: FakeAuthServer, oauth: OAuthClient,
                                                     get_code: GetCode) -> None:
    provider = fake.provider_config()
    code, verifier = await get_code(provider)
    args: dict[str, Any] = {"code": code, "redirect_uri": REDIRECT_URI,
                            "code_verifier": verifier, "now": NOW}
    first = grant_of(await oauth.exchange_code(provider, **args))
    e = error_of(await oauth.exchange_code(provider, **args))
    assert e.invalid_grant
    assert fake.is_valid_access_token(first.tokens.access_token) is None  # RFC 6749 §4.1.2


async def test_openid_scope_returns_id_token(fake: FakeAuthServer, oauth: OAuthClient,
                                             get_code: GetCode) -> None:
    provider = fake.provider_config(scopes=("openid",))
    code, verifier = await get_code(provider, nonce="n-1")
    g = grant_of(await oauth.exchange_code(provider, code=code, redirect_uri=REDIRECT_URI,
                                           code_verifier=verifier, now=NOW))
    assert g.id_token and g.id_token.count(".") == 2


async def test_form_encoded_responses_and_extra_fields(fake: FakeAuthServer,
                                                       oauth: OAuthClient) -> None:
    fake.form_encoded_responses = True
    fake.extra_token_fields = {"instance_url": "https://eu7.example.com"}
    fake.token_type = None
    provider = fake.provider_config()
    rt = fake.issue_tokens("alice", scopes=["a"])["refresh_token"]
    g = grant_of(await oauth.refresh(provider, rt, scopes=("a",), now=NOW))
    assert g.tokens.extra == {"instance_url": "https://eu7.example.com"}
    assert g.tokens.token_type == "Bearer" and g.tokens.expires_at == pytest.approx(NOW + 3600)


# --------------------------------------------------------------------------- refresh


async def test_refresh_with_rotation(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    provider = fake.provider_config()
    old = fake.issue_tokens("alice", scopes=["a", "b"])["refresh_token"]
    g = grant_of(await oauth.refresh(provider, old, scopes=("a", "b"), now=NOW))
    new = g.tokens.refresh_token
    assert new and new != old
    assert fake.is_valid_refresh_token(new) == "alice" and fake.is_valid_refresh_token(old) is None
    assert fake.requests[-1].params["scope"] == "a b"
    e = error_of(await oauth.refresh(provider, old, scopes=(), now=NOW))
    assert e.invalid_grant and e.status == 400 and old not in str(e)
    assert fake.grants["refresh_token"] == 2


async def test_refresh_without_rotation_and_omitted(fake: FakeAuthServer,
                                                    oauth: OAuthClient) -> None:
    provider = fake.provider_config()
    rt = fake.issue_tokens("alice", scopes=["a"])["refresh_token"]
    fake.rotate_refresh_tokens = False
    g = grant_of(await oauth.refresh(provider, rt, scopes=(), now=NOW))
    assert g.tokens.refresh_token == rt and g.tokens.scopes == ("a",)
    fake.omit_refresh_token = True
    g = grant_of(await oauth.refresh(provider, rt, scopes=("a",), now=NOW))
    assert g.tokens.refresh_token is None  # the caller keeps the old one
    assert fake.is_valid_refresh_token(rt) == "alice"


async def test_revoked_refresh_token_is_invalid_grant(fake: FakeAuthServer,
                                                      oauth: OAuthClient) -> None:
    provider = fake.provider_config()
    rt = fake.issue_tokens("alice")["refresh_token"]
    assert fake.revoke_user("alice") == 2
    assert error_of(await oauth.refresh(provider, rt, scopes=(), now=NOW)).invalid_grant


async def test_client_credentials(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    provider = fake.provider_config(grant="client_credentials", scopes=("svc",))
    g = grant_of(await oauth.client_credentials(provider, now=NOW))
    assert g.tokens.refresh_token is None and g.tokens.scopes == ("svc",)
    assert fake.is_valid_access_token(g.tokens.access_token) == provider.client_id
    assert fake.grants["client_credentials"] == 1


# --------------------------------------------------------------------------- faults


async def test_server_error_is_transient(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    provider = fake.provider_config()
    rt = fake.issue_tokens("alice")["refresh_token"]
    fake.fail_next(1, 503, "<html>down</html>", "text/html", headers={"Retry-After": "9"})
    e = error_of(await oauth.refresh(provider, rt, scopes=(), now=NOW))
    assert (e.error, e.status, e.transient, e.retry_after) == (
        "temporarily_unavailable", 503, True, 9.0)
    assert fake.is_valid_refresh_token(rt)  # the failure consumed nothing
    fake.fail_next(1, 500)
    e = error_of(await oauth.refresh(provider, rt, scopes=(), now=NOW))
    assert (e.error, e.transient) == ("server_error", True)
    grant_of(await oauth.refresh(provider, rt, scopes=(), now=NOW))


async def test_garbage_body_is_transient(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    fake.fail_next(1, 200, b"<html><body>Sign in</body></html>", "text/html")
    e = error_of(await oauth.client_credentials(fake.provider_config(), now=NOW))
    assert e.transient and e.error == "temporarily_unavailable"


async def test_provider_description_is_redacted(fake: FakeAuthServer,
                                                oauth: OAuthClient) -> None:
    rt = fake.issue_tokens("alice")["refresh_token"]
    fake.fail_next(1, 400, f'{{"error":"invalid_grant","error_description":"token {rt} bad"}}')
    e = error_of(await oauth.refresh(fake.provider_config(), rt, scopes=(), now=NOW))
    assert e.invalid_grant and rt not in str(e) and "[redacted]" in str(e)


async def test_timeout_while_server_holds_the_request(fake: FakeAuthServer,
                                                      session: aiohttp.ClientSession) -> None:
    fake.hold_tokens()
    quick = OAuthClient(session, timeout=0.2)
    e = error_of(await quick.client_credentials(fake.provider_config(), now=NOW))
    assert e.transient and e.error == "temporarily_unavailable" and "timed out" in str(e)
    assert fake.hits["token"] == 1 and fake.grants["client_credentials"] == 0
    fake.release_tokens()


async def test_cancellation_propagates(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    fake.hold_tokens()
    task = asyncio.create_task(oauth.client_credentials(fake.provider_config(), now=NOW))
    await fake.wait_for_hits("token", 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fake.release_tokens()


async def test_gate_holds_concurrent_requests(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    provider = fake.provider_config()
    fake.hold_tokens()
    tasks = [asyncio.create_task(oauth.client_credentials(provider, now=NOW)) for _ in range(5)]
    await fake.wait_for_hits("token", 5)
    assert not any(t.done() for t in tasks) and fake.grants["client_credentials"] == 0
    fake.release_tokens()
    results = await asyncio.gather(*tasks)
    assert len({grant_of(r).tokens.access_token for r in results}) == 5


async def test_unreachable_endpoint(oauth: OAuthClient, fake: FakeAuthServer,
                                    unused_tcp_port: int) -> None:
    provider = fake.provider_config(token_url=URL(f"http://127.0.0.1:{unused_tcp_port}/token"))
    e = error_of(await oauth.client_credentials(provider, now=NOW))
    assert e.transient and e.status is None and "unreachable" in str(e)


async def test_redirect_is_not_followed(fake: FakeAuthServer, oauth: OAuthClient,
                                        aiohttp_server: Any) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(str(fake.url / "token"))

    app = web.Application()
    app.router.add_post("/token", redirect)
    other = await aiohttp_server(app)
    provider = fake.provider_config(token_url=other.make_url("/token"))
    e = error_of(await oauth.client_credentials(provider, now=NOW))
    assert e.transient and e.status == 307
    assert fake.hits["token"] == 0  # the secret never went to the redirect target


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversized_body(oauth: OAuthClient, fake: FakeAuthServer, aiohttp_server: Any,
                              chunked: bool) -> None:
    sent = 0

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if not chunked:
            resp.content_length = 4 * MAX_BODY
        await resp.prepare(request)
        block = b'{"access_token":"' + b"a" * 65536
        try:
            while sent < 4 * MAX_BODY:
                await resp.write(block)
                sent += len(block)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return resp

    app = web.Application()
    app.router.add_post("/token", huge)
    server = await aiohttp_server(app)
    provider = fake.provider_config(token_url=server.make_url("/token"))
    e = error_of(await oauth.client_credentials(provider, now=NOW))
    assert e.transient and "too large" in str(e)


# --------------------------------------------------------------------------- revoke


async def test_revoke(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    provider = fake.provider_config()
    body = fake.issue_tokens("alice")
    assert await oauth.revoke(provider, body["refresh_token"], "refresh_token") is None
    assert fake.is_valid_refresh_token(body["refresh_token"]) is None
    assert fake.is_valid_access_token(body["access_token"]) is None  # family goes too
    assert fake.requests[-1].params["token_type_hint"] == "refresh_token"
    assert await oauth.revoke(provider, "unknown-token", None) is None  # RFC 7009 §2.2


async def test_revoke_errors(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    e = error_of(await oauth.revoke(fake.provider_config(revocation_url=None), "t", None))
    assert e.error == "unsupported" and fake.hits["revoke"] == 0
    fake.fail_next(1, 503, "", None, endpoint="revoke", headers={"Retry-After": "4"})
    e = error_of(await oauth.revoke(fake.provider_config(), "tok", None))
    assert e.transient and e.retry_after == 4.0
    e = error_of(await oauth.revoke(fake.provider_config(client_secret="nope"), "tok", None))
    assert e.error == "invalid_client" and not e.transient
