"""A whole gateway in-process: the real app on a real port, in front of the fake
authorization server and the fake upstream, with a real SQLite store in tmp_path."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.app import SERVICES, Services, create_app
from gateway.config import Config
from tests.fakes.authserver import FakeAuthServer, start_auth_server
from tests.fakes.upstream import FakeUpstream, start_upstream


@dataclass
class Clock:
    """The gateway's clock, advanced by tests (the servers keep real time)."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Gateway:
    auth: FakeAuthServer
    upstream: FakeUpstream
    server: TestServer
    app: web.Application
    clock: Clock
    config: Config
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def url(self) -> URL:
        return URL.build(scheme="http", host=self.server.host, port=self.server.port)

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    async def identity(self, name: str, password: str | None = None) -> str:
        _, key = await self.services.identities.add_identity(name, password)
        return key

    def client(self, **kw: Any) -> aiohttp.ClientSession:
        """A browser-like client: keeps cookies (also for 127.0.0.1), follows nothing itself."""
        s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kw)
        self.sessions.append(s)
        return s

    async def login(self, browser: aiohttp.ClientSession, name: str, password: str,
                    next_url: str = "/_gateway/") -> aiohttp.ClientResponse:
        page = await browser.get(self.url / "_gateway/login", params={"next": next_url})
        html = await page.text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', html)
        assert csrf, html
        return await browser.post(self.url / "_gateway/login", allow_redirects=False, data={
            "csrf": csrf.group(1), "name": name, "password": password, "next": next_url})

    async def follow_to_callback(self, browser: aiohttp.ClientSession,
                                 authorize: str) -> aiohttp.ClientResponse:
        """Visit the provider's authorize URL (auto-approving fake) and deliver its redirect
        to the gateway's callback in the same browser."""
        at_provider = await browser.get(authorize, allow_redirects=False)
        assert at_provider.status == 302, await at_provider.text()
        back = at_provider.headers["Location"]
        assert back.startswith(str(self.url / "_gateway/callback")), back
        return await browser.get(back, allow_redirects=False)

    async def connect(self, name: str, password: str, provider: str = "fake"
                      ) -> aiohttp.ClientResponse:
        """Log in as ``name`` and run the whole consent flow from the dashboard's Connect."""
        browser = self.client()
        resp = await self.login(browser, name, password)
        assert resp.status == 303, await resp.text()
        start = await browser.get(self.url / f"_gateway/connect/{provider}", allow_redirects=False)
        assert start.status == 302, await start.text()
        return await self.follow_to_callback(browser, start.headers["Location"])


@pytest.fixture
async def make_gateway(aiohttp_server: Callable[..., Any], unused_tcp_port_factory: Callable[[], int],
                       write_config: Callable[..., Config]) -> AsyncIterator[Callable[..., Any]]:
    made: list[Gateway] = []

    async def make(config: dict[str, Any] | None = None, provider: dict[str, Any] | None = None,
                   auth: FakeAuthServer | None = None, **auth_knobs: Any) -> Gateway:
        fake_auth = await start_auth_server(aiohttp_server, auth, **auth_knobs)
        upstream = await start_upstream(aiohttp_server)
        port = unused_tcp_port_factory()
        data: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
            "providers": {"fake": fake_auth.config_entry(upstream=str(upstream.url / "api"),
                                                         **(provider or {}))},
        }
        for k, v in (config or {}).items():
            data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
        cfg = write_config(data)
        clock = Clock()
        app = create_app(cfg, clock=clock)
        server = await aiohttp_server(app, port=port)
        gw = Gateway(fake_auth, upstream, server, app, clock, cfg)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        for s in gw.sessions:
            await s.close()
