"""Fixtures for the OAuth layer: a running fake authorization server and a client session."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from yarl import URL

from gateway.config import ProviderConfig
from gateway.oauth.protocol import authorize_url, new_pkce, new_state

REDIRECT_URI = "http://127.0.0.1:8080/_gateway/callback"

GetCode = Callable[..., Awaitable[tuple[str, str | None]]]


@pytest.fixture
def get_code(session: aiohttp.ClientSession) -> GetCode:
    """Run the front-channel half of the code flow: returns ``(code, code_verifier)``."""

    async def run(provider: ProviderConfig, *, redirect_uri: str = REDIRECT_URI,
                  pkce: bool = True, nonce: str | None = None) -> tuple[str, str | None]:
        verifier, challenge = new_pkce() if pkce else (None, None)
        state = new_state()
        url = authorize_url(provider, redirect_uri=redirect_uri, state=state,
                            code_challenge=challenge, nonce=nonce)
        async with session.get(url, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            location = URL(resp.headers["Location"])
        assert location.query["state"] == state
        assert str(location.with_query(None)) == redirect_uri
        return location.query["code"], verifier

    return run
