"""Shared fixtures. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.accesslog import install_redaction
from gateway.config import Config, load_config
from gateway.oauth.client import OAuthClient
from gateway.tokens.crypto import generate_key
from tests.fakes.authserver import FakeAuthServer, start_auth_server


@pytest.fixture
def encryption_key() -> str:
    return generate_key()


@pytest.fixture
def write_config(tmp_path: Path, encryption_key: str) -> Callable[..., Config]:
    """Write a config.yaml under tmp_path from a dict (merged over sane test defaults) and load it."""

    def make(data: dict[str, Any] | None = None, env: dict[str, str] | None = None,
             name: str = "config.yaml") -> Config:
        base: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": 0, "public_url": "http://127.0.0.1:8080"},
            "store": {"url": "sqlite:///gateway.db"},
            "encryption_key": encryption_key,
            "providers": {},
        }
        for k, v in (data or {}).items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k] = {**base[k], **v}
            else:
                base[k] = v
        path = tmp_path / name
        path.write_text(yaml.safe_dump(base))
        return load_config(path, env=env or {})

    return make


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeAuthServer:
    """The fake authorization server with its defaults (areas needing knobs override it)."""
    return await start_auth_server(aiohttp_server)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def oauth(session: aiohttp.ClientSession) -> OAuthClient:
    return OAuthClient(session, timeout=5.0)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record at DEBUG, created through the redaction layer as in production."""
    undo = install_redaction()
    caplog.set_level(logging.DEBUG)
    try:
        yield caplog
    finally:
        undo()
