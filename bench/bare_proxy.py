"""A minimal aiohttp pass-through proxy: the ceiling for a gateway built on aiohttp.

It does what any HTTP proxy must and nothing the gateway adds: no authentication, no token
lookup, no routing table, no access log, no metrics, no request id. It runs on the same stack
as ``gateway serve`` (aiohttp, uvloop, ``SO_REUSEPORT`` workers, one pooled
``ClientSession`` without decompression) and makes the same wire choices, so the gap between
the two is what the gateway's own work costs:

* hop-by-hop headers and ``Host`` are dropped, a static ``Authorization`` is set;
* a request body up to 64 KiB (the gateway's ``replay_body_bytes``) is read whole and sent
  with its length; a larger one streams; ``Content-Length`` is kept either way;
* the response streams back with its headers minus hop-by-hop ones.

    python bench/bare_proxy.py --upstream http://127.0.0.1:9001 --port 9003 --workers 2

``GET /_bare/healthz`` answers ``{"pid": ...}`` (the harness waits for every worker).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

HOP_BY_HOP = frozenset({"connection", "proxy-connection", "keep-alive", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authenticate",
                        "proxy-authorization"})
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "expect"}
REPLAY_BODY_BYTES = 64 * 1024
AUTHORIZATION = "Bearer static-benchmark-token"
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")  # as the gateway


class BareProxy:
    """Forwards every request to ``upstream`` + the request's raw path."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept-Encoding",), trust_env=False)

    async def stop(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in _REQUEST_DROP)
        headers[hdrs.AUTHORIZATION] = AUTHORIZATION
        data: bytes | AsyncIterator[bytes] | None = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= REPLAY_BODY_BYTES:
                data = await request.read()
            else:
                data = request.content.iter_any()
        url = URL(self._upstream + request.raw_path, encoded=True)
        async with self._session.request(request.method, url, headers=headers, data=data,
                                         allow_redirects=False, auto_decompress=False,
                                         skip_auto_headers=_NO_AUTO_HEADERS) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason, headers=CIMultiDict(
                (k, v) for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP))
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"pid": os.getpid()})


async def serve(upstream: str, port: int, reuse_port: bool) -> None:
    proxy = BareProxy(upstream)
    app = web.Application(client_max_size=0)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_get("/_bare/healthz", healthz)
    app.router.add_route("*", r"/{tail:[\s\S]*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=reuse_port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9001")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workers <= 1 or args.worker:
        _use_uvloop()
        asyncio.run(serve(args.upstream, args.port, reuse_port=args.worker))
        return 0
    # Like `gateway serve --workers N`: N processes bind the port with SO_REUSEPORT.
    children = [subprocess.Popen([sys.executable, __file__, "--upstream", args.upstream,
                                  "--port", str(args.port), "--worker"])
                for _ in range(args.workers)]

    def forward(signum: int, frame: object) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


if __name__ == "__main__":
    sys.exit(main())
