"""Discovery against a real third-party OpenID Provider (panva's oidc-provider on 127.0.0.1):
a config holding only ``issuer`` and client credentials must resolve to endpoints that a
real authorization-code flow with PKCE, and a client-credentials grant, succeed against."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.config import Config
from gateway.oauth.client import OAuthClient
from gateway.oauth.discovery import discover, resolve_providers
from gateway.oauth.protocol import TokenGrant, authorize_url, new_pkce, new_state
from tests.thirdparty.oidc import (
    REDIRECT_URI,
    OidcProvider,
    authorize_in_browser,
    browser_session,
)

pytestmark = pytest.mark.thirdparty
WriteConfig = Callable[..., Config]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def entry(op: OidcProvider, client_id: str, **extra: Any) -> dict[str, Any]:
    """Only what a user would write: the issuer and the client's credentials."""
    client = op.clients[client_id]
    out: dict[str, Any] = {"issuer": str(op.issuer), "client_id": client.client_id,
                           "upstream": str(op.issuer), **extra}
    if client.client_secret:
        out["client_secret"] = client.client_secret
    return out


async def test_metadata_matches_the_providers_own_document(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    meta = await discover(http, oidc_provider.issuer, timeout=10)
    assert meta.issuer == str(oidc_provider.issuer)
    assert meta.authorization_endpoint == oidc_provider.authorization_endpoint
    assert meta.token_endpoint == oidc_provider.token_endpoint
    assert meta.revocation_endpoint == oidc_provider.revocation_endpoint
    assert meta.jwks_uri == oidc_provider.jwks_uri
    assert meta.code_challenge_methods_supported == ("S256",)
    assert {"client_secret_basic", "client_secret_post", "none"} <= set(
        meta.token_endpoint_auth_methods_supported or ())
    assert meta.scopes_supported is not None and "openid" in meta.scopes_supported


async def test_issuer_only_config_runs_a_real_code_flow(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession,
        write_config: WriteConfig) -> None:
    cfg = write_config({"providers": {"op": entry(oidc_provider, "gw-post",
                                                  client_auth="client_secret_post",
                                                  scopes=["openid", "email"])}})
    provider = (await resolve_providers(http, cfg.providers, timeout=10))["op"]
    assert provider.usable, provider.problems
    assert provider.token_url == oidc_provider.token_endpoint
    assert provider.jwks_url == oidc_provider.jwks_uri and provider.pkce

    verifier, challenge = new_pkce()
    state = new_state()
    start = authorize_url(provider, redirect_uri=REDIRECT_URI, state=state,
                          code_challenge=challenge)
    async with browser_session() as browser:
        back = await authorize_in_browser(browser, start, stop_at=REDIRECT_URI)
    assert back.query["state"] == state
    grant = await OAuthClient(http, timeout=10).exchange_code(
        provider, code=back.query["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier,
        now=time.time())
    assert isinstance(grant, TokenGrant), grant
    assert grant.tokens.refresh_token and grant.id_token


async def test_issuer_only_service_client_gets_a_token_with_basic_auth(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession,
        write_config: WriteConfig) -> None:
    cfg = write_config({"providers": {"svc": entry(oidc_provider, "gw-service",
                                                   grant="client_credentials")}})
    provider = (await resolve_providers(http, cfg.providers, timeout=10))["svc"]
    assert provider.usable and provider.client_auth == "client_secret_basic"
    grant = await OAuthClient(http, timeout=10).client_credentials(provider, now=time.time())
    assert isinstance(grant, TokenGrant), grant


async def test_a_wrong_issuer_spelling_is_refused_by_the_real_server(
        oidc_provider: OidcProvider, http: aiohttp.ClientSession,
        write_config: WriteConfig) -> None:
    """The document's issuer has no trailing slash; OIDC Discovery §4.3 wants identity."""
    slashed = f"{oidc_provider.issuer}/"
    assert str(URL(slashed)) == slashed  # the configured spelling is kept as written
    cfg = write_config({"providers": {"op": {**entry(oidc_provider, "gw-basic"),
                                             "issuer": slashed}}})
    provider = (await resolve_providers(http, cfg.providers, timeout=10))["op"]
    assert not provider.usable and "must be identical" in provider.problems[0]
