"""The benchmark's helper servers, each run as its own process.

``stream``: an upstream for the 1 GiB tests. ``GET /api/stream?bytes=N`` sends N bytes of
the tests' deterministic :func:`~tests.fakes.upstream.pattern`; ``POST /api/upload`` hashes
what it receives and answers ``{"body_length", "body_sha256"}``; anything else answers a small
JSON body. No request is recorded, so it can serve for as long as it runs.

``token``: the tests' strict :class:`~tests.fakes.authserver.FakeAuthServer`, with
``--token-delay-ms`` added before every ``/token`` answer (a real provider is not instant, and
the storm should pile requests up behind one refresh), plus two benchmark endpoints:
``GET /bench/hits`` (the counters) and ``POST /bench/mint?subject=S`` (tokens for seeding a
store, as if a consent had just completed).

    python bench/servers.py stream --port 9001
    python bench/servers.py token --port 9002 --token-delay-ms 100
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web
from yarl import URL

from tests.fakes.authserver import FakeAuthServer
from tests.fakes.upstream import pattern

HOST = "127.0.0.1"


# --------------------------------------------------------------------------- stream upstream


async def _stream(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("bytes", "0"))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = n
    await resp.prepare(request)
    for block in pattern(n):
        await resp.write(block)
    await resp.write_eof()
    return resp


async def _upload(request: web.Request) -> web.Response:
    h, n = hashlib.sha256(), 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        n += len(chunk)
    return web.json_response({"body_length": n, "body_sha256": h.hexdigest()})


async def _small(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True, "pid": os.getpid()})


def stream_app() -> web.Application:
    app = web.Application(client_max_size=0)
    app.router.add_get("/api/stream", _stream)
    app.router.add_post("/api/upload", _upload)
    app.router.add_route("*", "/{tail:.*}", _small)
    return app


# --------------------------------------------------------------------------- token server


class BenchAuthServer(FakeAuthServer):
    """The fake authorization server with a fixed delay in front of ``/token``."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def _token(self, request: web.Request) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super()._token(request)

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.router.add_get("/bench/hits", self._hits)
        app.router.add_post("/bench/mint", self._mint)
        return app

    async def _hits(self, request: web.Request) -> web.Response:
        return web.json_response({"hits": dict(self.hits), "grants": dict(self.grants),
                                  "pid": os.getpid()})

    async def _mint(self, request: web.Request) -> web.Response:
        return web.json_response(self.issue_tokens(request.query.get("subject", "bench")))


# --------------------------------------------------------------------------- main


def use_uvloop() -> None:
    """The same event loop policy as ``gateway serve``."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port, backlog=4096).start()
    try:
        await asyncio.Event().wait()  # until SIGTERM
    finally:
        await runner.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("stream", "token"))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-delay-ms", type=float, default=0.0)
    args = ap.parse_args()
    use_uvloop()
    if args.kind == "stream":
        app = stream_app()
    else:
        fake = BenchAuthServer(args.token_delay_ms / 1000)
        fake.url = URL(f"http://{HOST}:{args.port}")
        app = fake.app
    asyncio.run(serve(app, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
