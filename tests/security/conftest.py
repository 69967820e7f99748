"""Fixtures for the security tests: the whole gateway (the real app from ``create_app``, the
fake authorization server, SQLite in tmp_path) in front of upstreams that record exactly what
reaches them or misbehave on purpose; raw HTTP over sockets; resource counters; and the
hypothesis settings every fuzz test here uses.

Providers of :func:`secure_gateway`:

* ``fake``  -> the shared fake upstream (``tests/fakes/upstream.py``) under ``/api``;
* ``rec``   -> recorder A under ``/v1/base`` (a base path with two segments);
* ``two``   -> recorder B under ``/b`` (another host:port).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, settings
from multidict import CIMultiDict
from yarl import URL

from gateway.app import create_app
from gateway.config import Config
from gateway.limits import parser_limits
from tests.fakes.authserver import FakeAuthServer, start_auth_server
from tests.fakes.upstream import start_upstream
from tests.integration.conftest import Clock, Gateway

PASSWORD = "correct horse battery staple"
RECORDED = b"recorded-by-upstream"

# --------------------------------------------------------------------------- hypothesis

_CI = bool(os.environ.get("CI"))
# SECURITY_FUZZ_SCALE=20 runs twenty times the examples (a deeper run, not the default one).
_SCALE = max(1, int(os.environ.get("SECURITY_FUZZ_SCALE", "1")))


def fuzz(max_examples: int) -> settings:
    """Modest example counts (the whole area runs in well under a minute), no deadline (real
    sockets), derandomized under CI so a red build reproduces."""
    return settings(max_examples=max_examples * _SCALE, deadline=None, derandomize=_CI,
                    database=None if _CI else settings().database,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# --------------------------------------------------------------------------- upstreams


@dataclass
class Hit:
    """One request as an upstream received it."""

    method: str
    raw_path: str
    host: str | None
    headers: list[tuple[str, str]]


@dataclass
class HostileUpstream:
    """Records every request exactly; ``mode`` chooses how it answers (the path never does,
    so fuzzed paths cannot stumble on a behaviour):

    * ``record``: 200 with :data:`RECORDED`;
    * ``drip``: ``drip_bytes`` bytes, one every ``drip_interval`` seconds;
    * ``reset_upload``: read ``reset_after`` bytes of the request body, then drop the
      connection without answering;
    * ``garbage``: bytes that are not HTTP, then close;
    * ``huge_header``: a response header of ``huge`` bytes;
    * ``many_headers``: ``huge`` response headers;
    * ``location``: a redirect to ``location`` (any host).
    """

    name: str
    mode: str = "record"
    hits: list[Hit] = field(default_factory=list)
    drip_bytes: int = 20
    drip_interval: float = 0.01
    reset_after: int = 1024
    huge: int = 64 * 1024
    location: str = "http://169.254.169.254/latest/meta-data/"
    body_closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: Any = None

    @property
    def url(self) -> URL:
        return URL.build(scheme="http", host=self.server.host, port=self.server.port)

    @property
    def authority(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(Hit(request.method, request.raw_path, request.headers.get("Host"),
                             [(k.decode("latin-1"), v.decode("latin-1"))
                              for k, v in request.raw_headers]))
        handler = getattr(self, "_" + self.mode)
        resp: web.StreamResponse = await handler(request)
        return resp

    async def _record(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=RECORDED)

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = self.drip_bytes
        await resp.prepare(request)
        for _ in range(self.drip_bytes):
            await resp.write(b".")
            await asyncio.sleep(self.drip_interval)  # the drip is the behaviour under test
        return resp

    async def _reset_upload(self, request: web.Request) -> web.StreamResponse:
        got = 0
        while got < self.reset_after:
            chunk = await request.content.readany()
            if not chunk:
                break
            got += len(chunk)
        assert request.transport is not None
        request.transport.abort()
        self.body_closed.set()
        return web.Response()

    async def _garbage(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.write(b"\x00\xffTHIS IS NOT HTTP\r\n\r\n<html>")
        request.transport.close()
        return web.Response()

    async def _huge_header(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x", headers={"X-Huge": "h" * self.huge})

    async def _many_headers(self, request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=b"x")
        for i in range(self.huge):
            resp.headers.add(f"X-H{i}", "v")
        return resp

    async def _location(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": self.location})


# --------------------------------------------------------------------------- gateway


@dataclass
class SecureGateway(Gateway):
    rec: HostileUpstream | None = None
    two: HostileUpstream | None = None
    key: str = ""  # alice's gateway key, once connected

    def __repr__(self) -> str:  # short: hypothesis prints it with every falsifying example
        return f"<SecureGateway on port {self.server.port}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # (hypothesis's pretty-printer)
        p.text(repr(self))

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def db_path(self) -> Path:
        assert self.config.store.path is not None
        return self.config.store.path

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def connect_alice(self, providers: tuple[str, ...] = ("fake",)) -> str:
        """Create ``alice`` and run the real consent flow for each provider."""
        self.key = await self.identity("alice", PASSWORD)
        for provider in providers:
            done = await self.connect("alice", PASSWORD, provider)
            assert done.status == 200, await done.text()
        return self.key


MakeSecure = Callable[..., Any]


@pytest.fixture
async def secure_gateway(aiohttp_server: Callable[..., Any],
                         unused_tcp_port_factory: Callable[[], int],
                         write_config: Callable[..., Config]) -> AsyncIterator[MakeSecure]:
    made: list[SecureGateway] = []

    async def make(config: dict[str, Any] | None = None, provider: dict[str, Any] | None = None,
                   auth: FakeAuthServer | None = None, server_kwargs: dict[str, Any] | None = None,
                   **auth_knobs: Any) -> SecureGateway:
        fake_auth = await start_auth_server(aiohttp_server, auth, **auth_knobs)
        upstream = await start_upstream(aiohttp_server)
        rec, two = HostileUpstream("rec"), HostileUpstream("two")
        rec.server = await aiohttp_server(rec.app())
        two.server = await aiohttp_server(two.app())
        port = unused_tcp_port_factory()
        entry = fake_auth.config_entry
        data: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": port,
                       "public_url": f"http://127.0.0.1:{port}"},
            "providers": {
                "fake": entry(**{"upstream": str(upstream.url / "api"), **(provider or {})}),
                "rec": entry(upstream=str(rec.url / "v1" / "base")),
                "two": entry(upstream=str(two.url / "b")),
            },
        }
        for k, v in (config or {}).items():
            data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
        cfg = write_config(data)
        clock = Clock()
        app = create_app(cfg, clock=clock)
        kwargs = parser_limits(cfg.server) if server_kwargs is None else server_kwargs
        server = await aiohttp_server(app, port=port, **kwargs)
        gw = SecureGateway(fake_auth, upstream, server, app, clock, cfg, rec=rec, two=two)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        for s in gw.sessions:
            await s.close()


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    raw: bytes


def parse_response(data: bytes) -> RawResponse | None:
    """The first response in ``data`` (None when the server sent nothing parseable)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.add(k.strip(), v.strip())
    return RawResponse(int(parts[1]), headers, rest, data)


async def raw_exchange(port: int, data: bytes, wait: float = 15.0, *,
                       until_close: bool = True) -> RawResponse | None:
    """Send ``data`` as it is on a fresh connection; read until the server closes (or, with
    ``until_close=False``, just the first response's head and Content-Length body: a server
    that lingers to drain an unsent request body would otherwise keep us waiting)."""

    async def go() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            if until_close:
                return await reader.read()
            head = await reader.readuntil(b"\r\n\r\n")
            parsed = parse_response(head)
            length = int(parsed.headers.get("Content-Length", "0")) if parsed else 0
            return head + await reader.readexactly(length)
        except (ConnectionResetError, asyncio.IncompleteReadError):
            return b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return parse_response(await asyncio.wait_for(go(), wait))


def request_bytes(method: str, target: str, headers: list[tuple[str, str]],
                  body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


# --------------------------------------------------------------------------- resources


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def connector_counts(session: aiohttp.ClientSession) -> tuple[int, int]:
    """(connections in use, idle pooled connections) of the gateway's upstream session."""
    connector: Any = session.connector
    return len(connector._acquired), sum(len(v) for v in connector._conns.values())


def server_connections(server: Any) -> int:
    return len(server.runner.server.connections)


async def settle(check: Callable[[], bool], within: float = 10.0) -> bool:
    """Poll ``check`` (yielding to the loop) until it holds or ``within`` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --------------------------------------------------------------------------- the database


def db_rows(path: Path, skip: tuple[str, ...] = ()) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read through a second, read-only connection."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(db.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr)
                for t in tables if t not in skip}
    finally:
        db.close()


def integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()
