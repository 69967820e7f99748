"""Fixtures for the token manager: a real SQLite store on a tmp file, the real fake
authorization server and OAuthClient over a real aiohttp session, and a clock tests advance.

Both the manager and the fake server read the same :class:`Clock`, so "an hour later" is one
call, with no sleeping.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.config import ProviderConfig
from gateway.oauth.client import OAuthClient
from gateway.store.base import Connection, Identity, TokenFields
from gateway.store.sqlite import SqliteStore
from gateway.tokens.crypto import SecretBox
from gateway.tokens.manager import TokenManager
from tests.fakes.authserver import FakeAuthServer, start_auth_server

T0 = 1_700_000_000.0
UPSTREAM = URL("http://127.0.0.1:9/api")


class Clock:
    """A settable POSIX clock shared by the manager and the fake server."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class CountingStore(SqliteStore):
    """The real SQLite store, counting connection reads (the hot path must make none)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0
        self.reading = asyncio.Event()  # set when a read has its answer
        self.hold_answers = asyncio.Event()  # clear it to hold answers back (races)
        self.hold_answers.set()

    async def get_connection(self, identity_id: int, provider: str) -> Connection | None:
        self.reads += 1
        conn = await super().get_connection(identity_id, provider)
        self.reading.set()
        await self.hold_answers.wait()
        return conn


class Events:
    """Collects ``on_event`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, str]] = []

    def __call__(self, kind: str, identity: str, provider: str, outcome: str) -> None:
        self.calls.append((kind, identity, provider, outcome))

    def outcomes(self) -> list[str]:
        return [c[3] for c in self.calls]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(os.urandom(32))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
async def open_store(db_path: Path, box: SecretBox) -> AsyncIterator[Callable[..., Any]]:
    """Open another CountingStore on the same file (another "process" sharing the store)."""
    opened: list[SqliteStore] = []

    async def make() -> CountingStore:
        s = CountingStore(db_path, box)
        await s.open()
        opened.append(s)
        return s

    yield make
    for s in reversed(opened):
        await s.close()


@pytest.fixture
async def store(open_store: Callable[..., Any]) -> CountingStore:
    s: CountingStore = await open_store()
    return s


@pytest.fixture
async def fake(aiohttp_server: Any, clock: Clock) -> FakeAuthServer:
    return await start_auth_server(aiohttp_server, clock=clock)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def providers(fake: FakeAuthServer) -> dict[str, ProviderConfig]:
    return {
        # upstream_from_token: the Salesforce-style opt-in; without it a token response's
        # instance_url is ignored (test_instance_url_becomes_the_lease_upstream).
        "fake": fake.provider_config("fake", upstream=UPSTREAM, upstream_from_token="instance_url"),
        "plain": fake.provider_config("plain", upstream=UPSTREAM),
        "machine": fake.provider_config("machine", upstream=UPSTREAM,
                                        grant="client_credentials", scopes=("api",)),
    }


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def make_manager(session: aiohttp.ClientSession, providers: dict[str, ProviderConfig],
                 clock: Clock, events: Events) -> Callable[..., TokenManager]:
    managers: list[TokenManager] = []

    def make(store: SqliteStore, *, timeout: float = 5.0, **kw: Any) -> TokenManager:
        kw.setdefault("clock", clock)
        kw.setdefault("on_event", events)
        m = TokenManager(store, OAuthClient(session, timeout=timeout), providers, **kw)
        managers.append(m)
        return m

    return make


@pytest.fixture
def manager(store: CountingStore, make_manager: Callable[..., TokenManager]) -> TokenManager:
    return make_manager(store)


@pytest.fixture
async def alice(store: CountingStore, clock: Clock) -> Identity:
    return await store.create_identity("alice", None, clock())


async def connect(store: SqliteStore, fake: FakeAuthServer, identity: Identity, clock: Clock,
                  *, refresh: bool = True, provider: str = "fake") -> Connection:
    """Seed a connection as the consent flow would: tokens minted by the fake server."""
    body = fake.issue_tokens(identity.name, refresh=refresh)
    expires_in = body.get("expires_in")
    tokens = TokenFields(access_token=body["access_token"],
                         refresh_token=body.get("refresh_token"),
                         expires_at=None if expires_in is None else clock() + expires_in)
    return await store.put_connection(identity.id, provider, tokens, None, clock())
