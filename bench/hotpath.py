"""Micro-benchmarks of the steps the gateway takes for every proxied request.

    .venv/bin/python bench/hotpath.py

Builds the real app (``create_app``) on a seeded store, starts its services, and times each
per-request step in isolation with a mocked request, warm caches, in one process:
authentication, the token lease, routing, the header policy both ways, the request id, the
metrics hooks and the access log line (formatted and written to /dev/null). The sum is a
lower bound of the gateway's own CPU per request (no cache misses, no socket work); compare
it with the end-to-end figures of ``bench/ablate.py`` and the bare proxy's CPU per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp.test_utils import TestServer, make_mocked_request
from multidict import CIMultiDict

from bench import seed
from gateway.accesslog import ACCESS_LOG, REDACT, setup_logging
from gateway.app import METRICS, SERVICES, create_app
from gateway.config import load_config
from gateway.proxy.headers import Forwarded, authorization_value, request_headers, response_headers
from gateway.proxy.routing import parse_target, rewrite_location, upstream_url

N = 20_000


def per_call(fn: Callable[[], Any], n: int = N) -> float:
    """Microseconds per call, best of three."""
    return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6


def _both(*calls: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for call in calls:
            call()

    return run


async def per_call_async(fn: Callable[[], Any], n: int = N) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


async def measure(config_path: Path, key: str) -> list[tuple[str, float]]:
    cfg = load_config(config_path)
    app = create_app(cfg)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        s = app[SERVICES]
        identity = await s.identities.authenticate_key(key)
        assert identity is not None
        headers = CIMultiDict({"Host": "127.0.0.1:8080", "User-Agent": "wrk",
                               "Authorization": f"Bearer {key}", "Accept": "*/*"})
        request = make_mocked_request("GET", "/bench/small", headers=headers, app=app)
        provider = s.providers["bench"]
        lease = await s.tokens.lease(identity, "bench")
        target = parse_target("/bench/small")
        base = provider.upstream
        assert base is not None
        up_headers = CIMultiDict({"Server": "nginx", "Date": "x", "Content-Type":
                                  "application/json", "Content-Length": "38",
                                  "Connection": "keep-alive"})
        fields = {"request_id": "84f1724540774123af7338b7cbdfdd86", "remote": "127.0.0.1",
                  "method": "GET", "path": "/bench/small", "status": 200, "provider": "bench",
                  "identity": "bench", "upstream_status": 200, "error": None,
                  "duration_ms": 1.234, "bytes_in": 0, "bytes_out": 167}
        metrics = app[METRICS]

        steps: list[tuple[str, float]] = [
            ("authenticate (bearer, key check, HMAC, cache hit)",
             await per_call_async(lambda: s.identities.authenticate_key(key))),
            ("token lease (cache hit, assess)",
             await per_call_async(lambda: s.tokens.lease(identity, "bench"))),
            ("REDACT.register of key and token", per_call(_both(
                lambda: REDACT.register(key), lambda: REDACT.register(lease.access_token)))),
            ("parse_target (routing, path checks)", per_call(
                lambda: parse_target("/bench/small"))),
            ("upstream_url", per_call(lambda: upstream_url(base, target))),
            ("request header policy (+ X-Forwarded-*)", per_call(lambda: request_headers(
                request.headers, authorization=authorization_value("Bearer", "t"),
                forwarded=Forwarded("127.0.0.1", "http", "127.0.0.1:8080")))),
            ("response header policy (+ Location rewrite hook)", per_call(
                lambda: response_headers(up_headers, lambda loc: rewrite_location(
                    loc, base, cfg.server.public_url / "bench")))),
            ("request id (uuid4().hex)", per_call(lambda: uuid.uuid4().hex)),
            ("metrics: request_done + upstream_answered + cache_lookup + in-flight", per_call(
                _both(lambda: metrics.request_done("bench", "GET", 200, 0.001, None),
                      lambda: metrics.upstream_answered("bench", 0.001),
                      lambda: metrics.cache_lookup("bench", True), metrics.in_flight.inc,
                      metrics.in_flight.dec))),
            ("access log line (record, scrub, JSON, write)", per_call(
                lambda: ACCESS_LOG.log(logging.INFO, "request", extra={"fields": fields}))),
        ]
        return steps
    finally:
        await server.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-hotpath-") as d:
        tmp = Path(d)
        ports = seed.Ports(1, 2, 3)  # never contacted: every step here is local
        config = seed.write_config(tmp / "gw", 8080, ports, seed.new_encryption_key(),
                                   tmp / "gw.db")
        key = asyncio.run(seed.seed(config)).key
        setup_logging("json", "INFO")
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        devnull = open(os.devnull, "w")
        handler.setStream(devnull)
        steps = asyncio.run(measure(config, key))
    width = max(len(name) for name, _ in steps)
    for name, us in steps:
        print(f"{name:<{width}}  {us:6.2f} us")
    print(f"{'sum':<{width}}  {sum(us for _, us in steps):6.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
