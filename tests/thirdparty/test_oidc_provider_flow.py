"""The gateway's OAuth code against a real, certified OpenID Provider (panva/oidc-provider).

Each test drives our own protocol/client/idtoken modules, exactly as the gateway does, and
lets oidc-provider judge them: a wrong reading of RFC 6749 (client authentication,
§2.3.1 encoding, code exchange), RFC 7636 (PKCE), RFC 7009 (revocation) or OIDC Core
(id_token) shows up as its error, not as a disagreement between two pieces of our own code.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.config import ProviderConfig
from gateway.oauth.client import OAuthClient
from gateway.oauth.idtoken import IdTokenVerifier, InvalidIdToken
from gateway.oauth.protocol import (
    OAuthError,
    TokenGrant,
    authorize_url,
    basic_credentials,
    new_pkce,
    new_state,
)
from tests.thirdparty.oidc import (
    REDIRECT_URI,
    SPECIAL_SECRET,
    OidcClient,
    OidcProvider,
    authorize_in_browser,
    browser_session,
)

pytestmark = pytest.mark.thirdparty


@dataclass(frozen=True, slots=True)
class Authorized:
    """What the redirect back to us carried, plus the secrets we kept for the exchange."""

    code: str
    verifier: str
    nonce: str
    redirect: URL


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def authorize(cfg: ProviderConfig, *, redirect_uri: str = REDIRECT_URI,
                    login: str = "alice") -> Authorized:
    """Run the front-channel half as a browser and check the redirect (RFC 6749 §4.1.2)."""
    state, nonce = new_state(), new_state()
    verifier, challenge = new_pkce()
    url = authorize_url(cfg, redirect_uri=redirect_uri, state=state, code_challenge=challenge,
                        nonce=nonce)
    async with browser_session() as browser:
        back = await authorize_in_browser(browser, url, stop_at=redirect_uri, login=login)
    assert str(back.with_query(None)) == redirect_uri
    assert "error" not in back.query, back.query.get("error_description")
    assert back.query["state"] == state  # §10.12: CSRF binding, echoed unchanged
    assert back.query.get("iss") == str(cfg.issuer)  # RFC 9207 mix-up defence
    return Authorized(code=back.query["code"], verifier=verifier, nonce=nonce, redirect=back)


async def exchange(client: OAuthClient, cfg: ProviderConfig, auth: Authorized,
                   **over: str) -> TokenGrant | OAuthError:
    return await client.exchange_code(
        cfg, code=over.get("code", auth.code), redirect_uri=over.get("redirect_uri", REDIRECT_URI),
        code_verifier=over.get("code_verifier", auth.verifier), now=time.time())


def granted(result: TokenGrant | OAuthError) -> TokenGrant:
    assert isinstance(result, TokenGrant), f"expected tokens, got {result}"
    return result


def refused(result: TokenGrant | OAuthError | None, error: str) -> OAuthError:
    assert isinstance(result, OAuthError), f"expected {error}, got {result!r}"
    assert result.error == error, str(result)
    assert not result.transient
    return result


async def userinfo(http: aiohttp.ClientSession, op: OidcProvider, access_token: str) -> int:
    headers = {"Authorization": f"Bearer {access_token}"}
    async with http.get(op.userinfo_endpoint, headers=headers) as resp:
        return resp.status


async def introspect(http: aiohttp.ClientSession, op: OidcProvider, token: str) -> dict[str, Any]:
    """RFC 7662, authenticated as the service client (as a resource server would be)."""
    svc = op.clients["gw-service"]
    headers = {"Authorization": basic_credentials(svc.client_id, svc.client_secret)}
    async with http.post(op.introspection_endpoint, data={"token": token},
                         headers=headers) as resp:
        assert resp.status == 200
        return await resp.json()


# --------------------------------------------------------------------------- full flow


async def test_code_flow_with_pkce_id_token_and_rotating_refresh(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    cfg = oidc_provider.provider_config("gw-basic")
    client = OAuthClient(http, timeout=10)
    auth = await authorize(cfg)

    before = time.time()
    grant = granted(await exchange(client, cfg, auth))
    tokens = grant.tokens
    assert tokens.access_token and tokens.refresh_token and grant.id_token
    assert tokens.token_type == "Bearer"
    assert tokens.expires_at is not None
    assert before + oidc_provider.access_token_ttl - 5 <= tokens.expires_at
    assert tokens.expires_at <= time.time() + oidc_provider.access_token_ttl
    assert {"openid", "email"} <= set(tokens.scopes)
    assert await userinfo(http, oidc_provider, tokens.access_token) == 200

    claims = await IdTokenVerifier(http).verify(
        grant.id_token, jwks_url=str(oidc_provider.jwks_uri), issuer=str(oidc_provider.issuer),
        client_id="gw-basic", nonce=auth.nonce, now=time.time())
    assert claims["sub"] == "alice"
    assert claims["aud"] in ("gw-basic", ["gw-basic"])

    # RFC 6749 §6 + RFC 9700 §4.14.2: a refresh rotates the refresh token.
    rotated = granted(await client.refresh(cfg, tokens.refresh_token, scopes=tokens.scopes,
                                           now=time.time()))
    new_rt = rotated.tokens.refresh_token
    assert new_rt is not None and new_rt != tokens.refresh_token
    assert rotated.tokens.access_token != tokens.access_token
    assert await userinfo(http, oidc_provider, rotated.tokens.access_token) == 200

    # The old refresh token is spent...
    refused(await client.refresh(cfg, tokens.refresh_token, scopes=(), now=time.time()),
            "invalid_grant")
    # ...and replaying it is treated as theft: oidc-provider revokes the whole grant, the new
    # refresh token included. This is why the gateway must never race two refreshes with one
    # refresh token (SPEC invariant 5): the loser's replay would kill the winner's tokens.
    refused(await client.refresh(cfg, new_rt, scopes=(), now=time.time()), "invalid_grant")
    assert await userinfo(http, oidc_provider, rotated.tokens.access_token) == 401


async def test_revoked_refresh_token_no_longer_works(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    cfg = oidc_provider.provider_config("gw-basic")
    client = OAuthClient(http, timeout=10)
    tokens = granted(await exchange(client, cfg, await authorize(cfg))).tokens
    assert tokens.refresh_token is not None
    assert (await introspect(http, oidc_provider, tokens.refresh_token))["active"] is True

    assert await client.revoke(cfg, tokens.refresh_token, "refresh_token") is None  # RFC 7009
    assert (await introspect(http, oidc_provider, tokens.refresh_token))["active"] is False
    refused(await client.refresh(cfg, tokens.refresh_token, scopes=(), now=time.time()),
            "invalid_grant")
    # §2.2: revoking an already-revoked (invalid) token still answers 200.
    assert await client.revoke(cfg, tokens.refresh_token, "refresh_token") is None


async def test_revoked_access_token_is_rejected_by_the_resource_server(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    cfg = oidc_provider.provider_config("gw-post")
    client = OAuthClient(http, timeout=10)
    tokens = granted(await exchange(client, cfg, await authorize(cfg))).tokens
    assert await userinfo(http, oidc_provider, tokens.access_token) == 200
    assert await client.revoke(cfg, tokens.access_token, "access_token") is None
    assert await userinfo(http, oidc_provider, tokens.access_token) == 401
    assert (await introspect(http, oidc_provider, tokens.access_token))["active"] is False


async def test_revocation_with_wrong_secret_is_refused(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    cfg = oidc_provider.provider_config("gw-basic")
    client = OAuthClient(http, timeout=10)
    tokens = granted(await exchange(client, cfg, await authorize(cfg))).tokens
    bad = replace(cfg, client_secret=cfg.client_secret + "x")
    err = refused(await client.revoke(bad, tokens.refresh_token or "", "refresh_token"),
                  "invalid_client")
    assert err.status == 401
    assert (await introspect(http, oidc_provider, tokens.refresh_token or ""))["active"] is True


# --------------------------------------------------------------------------- PKCE, code


async def test_wrong_code_verifier_is_invalid_grant(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    cfg = oidc_provider.provider_config("gw-basic")
    client = OAuthClient(http, timeout=10)
    auth = await authorize(cfg)
    other_verifier, _ = new_pkce()
    refused(await exchange(client, cfg, auth, code_verifier=other_verifier), "invalid_grant")


async def test_code_is_single_use_and_bound_to_redirect_uri(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    cfg = oidc_provider.provider_config("gw-post")
    client = OAuthClient(http, timeout=10)
    auth = await authorize(cfg)
    # RFC 6749 §4.1.3: redirect_uri must be identical to the authorization request's.
    refused(await exchange(client, cfg, auth, redirect_uri=REDIRECT_URI + "/other"),
            "invalid_grant")
    auth = await authorize(cfg)
    granted(await exchange(client, cfg, auth))
    refused(await exchange(client, cfg, auth), "invalid_grant")  # §4.1.2: single use


async def test_authorize_without_pkce_is_refused(oidc_provider: OidcProvider) -> None:
    cfg = replace(oidc_provider.provider_config("gw-basic"), pkce=False)
    url = authorize_url(cfg, redirect_uri=REDIRECT_URI, state=new_state(), code_challenge=None)
    async with browser_session() as browser:
        back = await authorize_in_browser(browser, url, stop_at=REDIRECT_URI)
    assert back.query["error"] == "invalid_request"
    assert "code" not in back.query


# --------------------------------------------------------------------------- client auth


@pytest.mark.parametrize("client_id", ["gw-basic", "gw-post", "gw-public"])
async def test_each_client_auth_method_is_accepted(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession, client_id: str) -> None:
    """RFC 6749 §2.3.1: the secret has ':' '%' '+' ' ' — form-encoded inside Basic, and
    form-encoded once in a POST body; oidc-provider decodes both per the RFC."""
    cfg = oidc_provider.provider_config(client_id)
    assert cfg.client_auth == oidc_provider.clients[client_id].auth_method
    if cfg.client_auth != "none":
        assert cfg.client_secret == SPECIAL_SECRET
    client = OAuthClient(http, timeout=10)
    grant = granted(await exchange(client, cfg, await authorize(cfg, login=f"user-{client_id}")))
    assert grant.tokens.refresh_token is not None
    granted(await client.refresh(cfg, grant.tokens.refresh_token, scopes=(), now=time.time()))


@pytest.mark.parametrize("client_id", ["gw-basic", "gw-post"])
async def test_wrong_client_secret_is_invalid_client(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession, client_id: str) -> None:
    good = oidc_provider.provider_config(client_id)
    auth = await authorize(good)
    # The raw, un-encoded secret: what a client that skipped §2.3.1's encoding would send
    # inside Basic; for POST, a near miss.
    bad = replace(good, client_secret=SPECIAL_SECRET.replace("%41", "A"))
    err = refused(await exchange(OAuthClient(http, timeout=10), bad, auth), "invalid_client")
    assert err.status == 401
    assert SPECIAL_SECRET not in str(err) and auth.code not in str(err)
    granted(await exchange(OAuthClient(http, timeout=10), good, auth))  # code not burnt


async def test_basic_auth_without_form_encoding_is_refused(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    """Shows the test above has teeth: the same secret, base64'd raw (no §2.3.1 encoding),
    decodes to something else at a conforming server ('%41' -> 'A', '+' -> ' ')."""
    cfg = oidc_provider.provider_config("gw-basic")
    auth = await authorize(cfg)
    raw = base64.b64encode(f"gw-basic:{SPECIAL_SECRET}".encode()).decode()
    form = {"grant_type": "authorization_code", "code": auth.code,
            "redirect_uri": REDIRECT_URI, "code_verifier": auth.verifier}
    async with http.post(oidc_provider.token_endpoint, data=form,
                         headers={"Authorization": f"Basic {raw}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_client"
    assert basic_credentials("gw-basic", SPECIAL_SECRET) != f"Basic {raw}"


async def test_client_credentials_grant(oidc_provider: OidcProvider,
                                        http: aiohttp.ClientSession) -> None:
    cfg = oidc_provider.provider_config("gw-service", scopes=())
    assert cfg.grant == "client_credentials"
    grant = granted(await OAuthClient(http, timeout=10).client_credentials(cfg, now=time.time()))
    assert grant.tokens.refresh_token is None  # RFC 6749 §4.4.3: SHOULD NOT be included
    info = await introspect(http, oidc_provider, grant.tokens.access_token)
    assert info["active"] is True and info["client_id"] == "gw-service"

    bad = replace(cfg, client_secret="nope")
    refused(await OAuthClient(http, timeout=10).client_credentials(bad, now=time.time()),
            "invalid_client")


# --------------------------------------------------------------------------- id_token


async def test_id_token_checks_reject_wrong_nonce_audience_and_issuer(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    cfg = oidc_provider.provider_config("gw-post")
    auth = await authorize(cfg)
    grant = granted(await exchange(OAuthClient(http, timeout=10), cfg, auth))
    assert grant.id_token is not None
    verifier = IdTokenVerifier(http)
    args: dict[str, Any] = {
        "jwks_url": str(oidc_provider.jwks_uri), "issuer": str(oidc_provider.issuer),
        "client_id": "gw-post", "nonce": auth.nonce, "now": time.time()}
    claims = await verifier.verify(grant.id_token, **args)
    assert claims["nonce"] == auth.nonce and claims["iss"] == str(oidc_provider.issuer)
    for wrong in ({"nonce": new_state()}, {"client_id": "gw-basic"},
                  {"issuer": str(oidc_provider.issuer) + "/"}):
        with pytest.raises(InvalidIdToken):
            await verifier.verify(grant.id_token, **{**args, **wrong})


# --------------------------------------------------------------------------- fixture factory


async def test_factory_native_client_accepts_any_loopback_port(
        oidc_provider_factory: Callable[..., OidcProvider],
        http: aiohttp.ClientSession) -> None:
    """For the end-to-end test: register before the gateway's port is known (RFC 8252 §7.3);
    a web client's redirect_uri must match exactly."""
    op = oidc_provider_factory(
        [OidcClient("native", "n:" + SPECIAL_SECRET, "http://127.0.0.1/_gateway/callback",
                    native=True),
         OidcClient("web", "w", "http://127.0.0.1:1/_gateway/callback")],
        access_token_ttl=7)
    actual = "http://127.0.0.1:54321/_gateway/callback"
    cfg = op.provider_config("native")
    auth = await authorize(cfg, redirect_uri=actual)
    grant = granted(await exchange(OAuthClient(http, timeout=10), cfg, auth, redirect_uri=actual))
    assert grant.tokens.expires_at is not None
    assert grant.tokens.expires_at - time.time() <= 7

    web = op.provider_config("web")
    url = authorize_url(web, redirect_uri=actual, state=new_state(), code_challenge=new_pkce()[1])
    async with http.get(url, allow_redirects=False) as resp:  # never redirects to a stranger
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_redirect_uri"
