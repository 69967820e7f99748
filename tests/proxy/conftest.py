"""Fixtures for the proxy tests: a fake upstream behind a real gateway app.

The gateway app is the real edge (``error_middleware``) plus :class:`ProxyHandler` on
``/{tail:.*}``, with a small in-test token source and an authenticate function that accepts
one gateway key. ``raw_request`` speaks HTTP/1.1 over a socket for targets that an HTTP
client library would normalise.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from gateway.config import ProviderConfig, ServerConfig
from gateway.errors import Unauthenticated
from gateway.middleware import error_middleware
from gateway.proxy.handler import ProxyHandler, make_client_session, refuse_connect
from gateway.store.base import Identity
from gateway.tokens.source import Lease
from tests.fakes.upstream import FakeUpstream, start_upstream

GATEWAY_KEY = "gwk_test_key_never_forwarded"
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
ALICE = Identity(id=1, name="alice")


@dataclass
class Tokens:
    """A TokenSource: hands out ``token``; ``rejected`` swaps in ``next_token`` (if any)."""

    token: str = "good-token"
    next_token: str | None = None
    token_type: str = "Bearer"
    upstream: URL | None = None
    leases: int = 0
    rejections: list[str] = field(default_factory=list)

    async def lease(self, identity: Identity, provider: str) -> Lease:
        assert identity == ALICE
        self.leases += 1
        return Lease(self.token, self.token_type, version=self.leases, upstream=self.upstream)

    async def rejected(self, identity: Identity, provider: str, lease: Lease) -> Lease | None:
        self.rejections.append(lease.access_token)
        if self.next_token is None:
            return None
        self.token, self.next_token = self.next_token, None
        return await self.lease(identity, provider)


async def authenticate(request: web.Request) -> Identity:
    for name in ("Authorization", "Proxy-Authorization"):
        if request.headers.get(name) == f"Bearer {GATEWAY_KEY}":
            return ALICE
    raise Unauthenticated("A gateway key is required.")


@dataclass
class Gateway:
    server: TestServer
    session: aiohttp.ClientSession  # a plain client talking to the gateway
    tokens: Tokens
    upstream: FakeUpstream

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def url(self, raw: str) -> URL:
        """A gateway URL from a raw target, sent without re-encoding."""
        return URL(f"http://127.0.0.1:{self.port}{raw}", encoded=True)

    def request(self, method: str, raw: str, **kw: Any) -> Any:
        headers = {**AUTH, **kw.pop("headers", {})}
        return self.session.request(method, self.url(raw), headers=headers,
                                    allow_redirects=False, auto_decompress=False, **kw)


@pytest.fixture
async def upstream(aiohttp_server: Any) -> FakeUpstream:
    return await start_upstream(aiohttp_server)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port with a bound but non-listening socket: connecting is refused, reliably."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(aiohttp_server: Any, upstream: FakeUpstream, refused_port: int
                       ) -> AsyncIterator[MakeGateway]:
    sessions: list[aiohttp.ClientSession] = []

    async def make(server: ServerConfig | None = None, tokens: Tokens | None = None,
                   **server_overrides: Any) -> Gateway:
        cfg = replace(server or ServerConfig(public_url=URL("http://gw.example:8080")),
                      **server_overrides)
        providers = {
            "up": ProviderConfig(name="up", upstream=upstream.url / "api"),
            "root": ProviderConfig(name="root", upstream=upstream.url),
            "sf": ProviderConfig(name="sf", upstream=upstream.url / "api",
                                 upstream_from_token="instance_url"),
            "down": ProviderConfig(name="down", upstream=URL(f"http://127.0.0.1:{refused_port}")),
            "nocfg": ProviderConfig(name="nocfg", problems=("client_id is not set",)),
        }
        upstream_session = make_client_session(cfg)
        tok = tokens or Tokens()
        handler = ProxyHandler(providers, cfg, upstream_session, tok, authenticate)
        app = web.Application(middlewares=[error_middleware, refuse_connect])
        app.router.add_route("*", r"/{tail:[\s\S]*}", handler.handle)
        srv = await aiohttp_server(app)
        client = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        sessions.extend([upstream_session, client])
        return Gateway(srv, client, tok, upstream)

    yield make
    for s in sessions:
        await s.close()


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> Gateway:
    return await make_gateway()


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def raw_request(port: int, head: bytes, body: bytes = b"") -> RawResponse:
    """Send bytes as they are; read one response until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    header_block, _, rest = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.add(k.strip(), v.strip())
    if headers.get("Transfer-Encoding") == "chunked":
        rest = _dechunk(rest)
    return RawResponse(int(lines[0].split()[1]), headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


def get(raw_target: str, extra: str = "") -> bytes:
    """A raw GET with the gateway key, closing the connection after the answer."""
    return (f"GET {raw_target} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {GATEWAY_KEY}"
            f"\r\nConnection: close\r\n{extra}\r\n").encode("utf-8", "surrogateescape")
