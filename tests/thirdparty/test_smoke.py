"""The third-party provider starts and describes itself as the gateway expects (discovery)."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest

from tests.thirdparty.oidc import OidcProvider

pytestmark = pytest.mark.thirdparty


async def test_discovery_document_lists_what_the_gateway_needs(oidc_provider: OidcProvider) -> None:
    url = oidc_provider.issuer / ".well-known" / "openid-configuration"
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        meta = await resp.json()
    assert meta["issuer"] == str(oidc_provider.issuer)
    for key in ("authorization_endpoint", "token_endpoint", "revocation_endpoint",
                "introspection_endpoint", "jwks_uri", "userinfo_endpoint"):
        assert meta[key].startswith(str(oidc_provider.issuer) + "/"), key
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert {"client_secret_basic", "client_secret_post", "none"} <= set(
        meta["token_endpoint_auth_methods_supported"])
    assert {"authorization_code", "refresh_token", "client_credentials"} <= set(
        meta["grant_types_supported"])


def test_bad_server_settings_fail_fast_with_the_reason(
        oidc_provider_factory: Callable[..., OidcProvider]) -> None:
    """A broken setup must say why at once, not hang until the startup deadline."""
    with pytest.raises(RuntimeError, match="OIDC_CLIENTS is not valid JSON"):
        oidc_provider_factory(env={"OIDC_CLIENTS": "{not json"})
    with pytest.raises(RuntimeError, match="OIDC_ACCESS_TOKEN_TTL must be a positive"):
        oidc_provider_factory(access_token_ttl=0)
