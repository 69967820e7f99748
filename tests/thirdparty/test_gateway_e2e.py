"""The whole gateway against a real third-party authorization server (panva's oidc-provider):
consent through the gateway's own pages, then proxied calls to the provider's userinfo
endpoint (a real bearer-protected API), refresh with rotation, reactive refresh after the
provider revoked the access token, and revocation."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.app import SERVICES, create_app
from gateway.config import load_config
from gateway.connections import revoke_connection
from gateway.oauth.protocol import OAuthError
from tests.integration.conftest import Clock
from tests.thirdparty.oidc import SPECIAL_SECRET, OidcClient, authorize_in_browser, browser_session

pytestmark = pytest.mark.thirdparty
PW = "a long enough password"


async def test_consent_proxy_refresh_and_revoke_through_the_gateway(
        oidc_provider_factory: Callable[..., Any], aiohttp_server: Callable[..., Any],
        unused_tcp_port_factory: Callable[[], int], tmp_path: Path, encryption_key: str) -> None:
    port = unused_tcp_port_factory()
    callback = f"http://127.0.0.1:{port}/_gateway/callback"
    op = oidc_provider_factory([OidcClient("gw-e2e", SPECIAL_SECRET, callback)],
                               redirect_uri=callback, access_token_ttl=600)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
        "store": {"url": "sqlite:///gw.db"},
        "encryption_key": encryption_key,
        "providers": {"op": {
            "issuer": str(op.issuer), "authorize_url": str(op.authorization_endpoint),
            "token_url": str(op.token_endpoint), "revocation_url": str(op.revocation_endpoint),
            "jwks_url": str(op.jwks_uri), "client_id": "gw-e2e", "client_secret": "${OP_SECRET}",
            "scopes": ["openid", "email"], "upstream": str(op.issuer),
        }},
    }))
    config = load_config(tmp_path / "config.yaml", env={"OP_SECRET": SPECIAL_SECRET})
    clock = Clock()
    app = create_app(config, clock=clock)
    server = await aiohttp_server(app, port=port)
    base = f"http://127.0.0.1:{server.port}"
    services = app[SERVICES]
    _, key = await services.identities.add_identity("alice", PW)
    auth = {"Authorization": f"Bearer {key}"}

    async with browser_session() as browser:
        page = await (await browser.get(f"{base}/_gateway/login")).text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        login = await browser.post(f"{base}/_gateway/login", allow_redirects=False,
                                   data={"csrf": csrf, "name": "alice", "password": PW,
                                         "next": "/_gateway/"})
        assert login.status == 303
        start = await browser.get(f"{base}/_gateway/connect/op", allow_redirects=False)
        assert start.status == 302
        back = await authorize_in_browser(browser, start.headers["Location"], stop_at=callback,
                                          login="alice")
        done = await browser.get(back, allow_redirects=False)
        assert done.status == 200, await done.text()

        [conn] = await services.store.list_connections()
        assert conn.account_id == "alice"  # the verified id_token's sub
        assert conn.tokens.refresh_token and "openid" in conn.tokens.scopes

        me = await browser.get(f"{base}/op/me", headers=auth)
        assert me.status == 200, await me.text()
        assert (await me.json())["sub"] == "alice"

        # Proactive refresh: past expiry the gateway refreshes (the provider rotates).
        clock.advance(3600)
        me = await browser.get(f"{base}/op/me", headers=auth)
        assert me.status == 200, await me.text()
        [rotated] = await services.store.list_connections()
        assert rotated.tokens.refresh_token != conn.tokens.refresh_token
        assert rotated.version > conn.version

        # The provider revokes the access token, and oidc-provider revokes the whole grant
        # with it: the upstream's 401 makes the gateway refresh once, the refresh token is
        # refused, and the client learns it must re-consent (not a bare upstream 401).
        assert await services.oauth.revoke(config.providers["op"], rotated.tokens.access_token,
                                           "access_token") is None
        me = await browser.get(f"{base}/op/me", headers=auth)
        assert me.status == 401 and me.headers["Gateway-Error"] == "reconsent_required"
        assert (await me.json())["connect_url"].startswith(f"{base}/_gateway/connect/op?link=")
        [marked] = await services.store.list_connections()
        assert marked.status == "reconsent_required"

        # Consenting again restores the connection.
        start = await browser.get(f"{base}/_gateway/connect/op", allow_redirects=False)
        back = await authorize_in_browser(browser, start.headers["Location"], stop_at=callback,
                                          login="alice")
        assert (await browser.get(back, allow_redirects=False)).status == 200
        me = await browser.get(f"{base}/op/me", headers=auth)
        assert me.status == 200, await me.text()

        # Revocation (RFC 7009) through the shared operation, then the tokens are gone.
        [latest] = await services.store.list_connections()
        outcome = await revoke_connection(services.store, services.oauth,
                                          config.providers["op"], latest.identity_id, "op")
        assert outcome.revoked_at_provider
        result = await services.oauth.refresh(config.providers["op"], latest.tokens.refresh_token or "",
                                              scopes=(), now=clock())
        assert isinstance(result, OAuthError) and result.invalid_grant
        services.tokens.invalidate(latest.identity_id, "op")
        gone = await browser.get(f"{base}/op/me", headers=auth)
        assert gone.status == 401 and gone.headers["Gateway-Error"] == "consent_required"
