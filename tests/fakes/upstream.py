"""A fake upstream API, as a real aiohttp app, for tests that need something behind the proxy.

Every request is recorded exactly (:class:`RecordedRequest`: method, raw request target with
its query, raw headers in order, body SHA-256 and length, hashed incrementally so large
bodies are never held); ``received`` is set on every request, ``body_failed`` when a body
breaks off (the caller went away). The endpoint is chosen by the *last* path segment, so any
base path works (``/api/stream`` and ``/stream`` are the same endpoint); anything else is the echo.

* echo (default), ``upload``: JSON of the recorded request (``status`` query sets the code);
* ``stream?bytes=N[&length=1][&status=S]``: N bytes of :func:`pattern`, generated on the
  fly, chunked (or with Content-Length when ``length=1``);
* ``gzip``: :data:`GZIP_BODY` with ``Content-Encoding: gzip``;
* ``redirect?to=LOCATION&status=302``: a redirect (default: an absolute URL to
  ``<base>/landing``);
* ``protected``: 401 (:data:`DENIED_BODY`) unless ``Authorization: Bearer T`` with T in
  ``accepted_tokens``; the echo otherwise;
* ``hop``: a response full of hop-by-hop headers and a gateway cookie;
* ``slow``: never answers until ``release`` is set; sets ``slow_started``, and
  ``slow_cancelled`` if the connection goes away first;
* ``slow-body``: headers and a first chunk, then waits for ``release``;
* ``reset``: aborts the connection without answering; ``reset-mid-body``: after 64 KiB of a
  1 MiB body;
* ``ws``: WebSocket echo (subprotocols ``chat``/``superchat``; 401 like ``protected``
  without an accepted token). The text ``close:CODE``
  makes it close with CODE (reason ``bye``), ``abort`` drops the connection; close codes
  it receives are appended to ``ws_close_codes`` (and ``ws_closed`` is set).

Usage::

    upstream = await start_upstream(aiohttp_server)
    base = upstream.url / "api"
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from yarl import URL

CHUNK = 64 * 1024
GZIP_BODY = gzip.compress(b'{"hello": "world"}\n' * 500, mtime=0)
DENIED_BODY = b'{"upstream": "denied"}'


def pattern(n: int) -> Iterator[bytes]:
    """N deterministic bytes in 64 KiB chunks, each chunk different (order matters)."""
    i = 0
    while n > 0:
        block = (hashlib.sha256(i.to_bytes(8, "big")).digest() * (CHUNK // 32))[:n]
        n -= len(block)
        i += 1
        yield block


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for block in pattern(n):
        h.update(block)
    return h.hexdigest()


@dataclass
class RecordedRequest:
    """One request as the upstream saw it; body fields are filled once the body is read."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_sha256: str | None = None
    body_length: int | None = None

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def as_json(self) -> dict[str, Any]:
        return {"method": self.method, "raw_path": self.raw_path,
                "headers": [list(h) for h in self.headers],
                "body_sha256": self.body_sha256, "body_length": self.body_length}


@dataclass
class FakeUpstream:
    requests: list[RecordedRequest] = field(default_factory=list)
    accepted_tokens: set[str] = field(default_factory=lambda: {"good-token"})
    release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    slow_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    body_failed: asyncio.Event = field(default_factory=asyncio.Event)
    ws_closed: asyncio.Event = field(default_factory=asyncio.Event)
    ws_close_codes: list[int | None] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> URL:
        assert self.server is not None
        return URL.build(scheme="http", host=self.server.host, port=self.server.port)

    def hits(self, endpoint: str) -> int:
        return sum(1 for r in self.requests if _endpoint(r.raw_path) == endpoint)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        rec = RecordedRequest(
            request.method, request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers])
        self.requests.append(rec)
        self.received.set()
        name = _endpoint(request.raw_path)
        handler = getattr(self, "_ep_" + name.replace("-", "_"), None)
        if handler is None:
            handler = self._ep_echo
        resp: web.StreamResponse = await handler(request, rec)
        return resp

    async def _read_body(self, request: web.Request, rec: RecordedRequest) -> None:
        h, n = hashlib.sha256(), 0
        try:
            async for chunk in request.content.iter_any():
                h.update(chunk)
                n += len(chunk)
        except BaseException:
            self.body_failed.set()
            raise
        rec.body_sha256, rec.body_length = h.hexdigest(), n

    async def _ep_echo(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        await self._read_body(request, rec)
        return web.json_response(rec.as_json(), status=int(request.query.get("status", 200)))

    _ep_upload = _ep_echo

    async def _ep_stream(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        n = int(request.query.get("bytes", "0"))
        resp = web.StreamResponse(status=int(request.query.get("status", 200)),
                                  headers={"Content-Type": "application/octet-stream"})
        if request.query.get("length") == "1":
            resp.content_length = n
        await resp.prepare(request)
        for block in pattern(n):
            await resp.write(block)
        await resp.write_eof()
        return resp

    async def _ep_gzip(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        return web.Response(body=GZIP_BODY, headers={"Content-Encoding": "gzip",
                                                     "Content-Type": "application/json"})

    async def _ep_redirect(self, request: web.Request, rec: RecordedRequest
                           ) -> web.StreamResponse:
        base = str(self.url / "api" / "landing")
        location = request.query.get("to", base)
        return web.Response(status=int(request.query.get("status", 302)),
                            headers={"Location": location}, text="moved")

    async def _ep_protected(self, request: web.Request, rec: RecordedRequest
                            ) -> web.StreamResponse:
        if not self._authorized(request):
            await self._read_body(request, rec)
            return self._denied()
        return await self._ep_echo(request, rec)

    async def _ep_hop(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        resp = web.Response(text="hop", headers={
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
            "Upgrade": "h2c",
            "Trailer": "X-Checksum",
            "X-Kept": "yes",
        })
        resp.headers.add("Set-Cookie", "gateway_session=fixated; Path=/")
        resp.headers.add("Set-Cookie", "upstream_cookie=1; Path=/")
        return resp

    async def _ep_slow(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        self.slow_started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.slow_cancelled.set()
            raise
        return web.Response(text="finally")

    async def _ep_slow_body(self, request: web.Request, rec: RecordedRequest
                            ) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 2 * CHUNK
        await resp.prepare(request)
        await resp.write(b"x" * CHUNK)
        self.slow_started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.slow_cancelled.set()
            raise
        await resp.write(b"x" * CHUNK)
        return resp

    async def _ep_reset(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    async def _ep_reset_mid_body(self, request: web.Request, rec: RecordedRequest
                                 ) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 16 * CHUNK
        await resp.prepare(request)
        await resp.write(b"y" * CHUNK)
        assert request.transport is not None
        request.transport.abort()
        return resp

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme == "Bearer" and token in self.accepted_tokens

    def _denied(self) -> web.Response:
        return web.Response(status=401, body=DENIED_BODY, content_type="application/json",
                            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def _ep_ws(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        if not self._authorized(request):
            return self._denied()
        ws = web.WebSocketResponse(protocols=("chat", "superchat"))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]), message=b"bye")
                break
            if msg.type is WSMsgType.TEXT and msg.data == "abort":
                assert request.transport is not None
                request.transport.abort()
                break
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.ws_close_codes.append(ws.close_code)
        self.ws_closed.set()
        return ws


def _endpoint(raw_path: str) -> str:
    path = raw_path.split("?", 1)[0]
    return path.rstrip("/").rsplit("/", 1)[-1]


async def start_upstream(aiohttp_server: Any) -> FakeUpstream:
    """Start a :class:`FakeUpstream` on the ``aiohttp_server`` fixture (handler cancellation
    on, so ``slow_cancelled`` reports a caller that went away)."""
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app())
    return fake


__all__ = ["CHUNK", "DENIED_BODY", "GZIP_BODY", "FakeUpstream", "RecordedRequest", "pattern",
           "pattern_sha256", "start_upstream"]
