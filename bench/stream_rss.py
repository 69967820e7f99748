"""Measure the gateway process's memory while 1 GiB streams through it each way.

SPEC invariant 3 says bodies stream without being held in memory. This runs the proxy
handler in a child process (static token, fixed identity) in front of the fake upstream,
downloads and uploads ``--bytes`` through it, samples the child's RSS (``/proc/PID/status``,
Linux) every 20 ms, checks the content hashes, and fails (exit 1) when the peak RSS rises
more than ``--limit-mib`` above the baseline taken after a warm-up request.

    .venv/bin/python bench/stream_rss.py                  # 1 GiB each way, limit 64 MiB
    .venv/bin/python bench/stream_rss.py --bytes 268435456
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.config import ProviderConfig, ServerConfig
from gateway.middleware import error_middleware
from gateway.proxy.handler import ProxyHandler, make_client_session
from gateway.store.base import Identity
from gateway.tokens.source import Lease
from tests.fakes.upstream import FakeUpstream, pattern, pattern_sha256

GIB = 1024 ** 3


class _StaticTokens:
    async def lease(self, identity: Identity, provider: str) -> Lease:
        return Lease("good-token")

    async def rejected(self, identity: Identity, provider: str, lease: Lease) -> Lease | None:
        return None


async def _anyone(request: web.Request) -> Identity:
    return Identity(id=1, name="bench")


async def child(upstream: str) -> None:
    """The measured process: the proxy handler behind the real error middleware."""
    server = ServerConfig(max_body_bytes=4 * GIB, read_timeout=120)
    session = make_client_session(server)
    providers = {"up": ProviderConfig(name="up", upstream=URL(upstream) / "api")}
    handler = ProxyHandler(providers, server, session, _StaticTokens(), _anyone)
    app = web.Application(middlewares=[error_middleware])
    app.router.add_route("*", r"/{tail:[\s\S]*}", handler.handle)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await session.close()
    await runner.cleanup()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _body(n: int) -> AsyncIterator[bytes]:
    for block in pattern(n):
        yield block


async def parent(n: int, limit_mib: float) -> int:
    fake = FakeUpstream()
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up_port = runner.addresses[0][1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child", f"http://127.0.0.1:{up_port}",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    port = int((await proc.stdout.readline()).decode())
    base = f"http://127.0.0.1:{port}/up"
    peak = {"value": 0.0}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            peak["value"] = max(peak["value"], _rss_mib(proc.pid))
            try:
                await asyncio.wait_for(stop.wait(), 0.02)
            except TimeoutError:
                pass

    failures = 0
    expected = pattern_sha256(n)
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(f"{base}/stream?bytes={1024 * 1024}") as r:
            await r.read()
        baseline = _rss_mib(proc.pid)
        print(f"gateway pid {proc.pid}, baseline RSS {baseline:.1f} MiB, "
              f"{n / GIB:.2f} GiB each way")
        sampler = asyncio.create_task(sample())

        t0 = time.monotonic()
        h, got = hashlib.sha256(), 0
        async with client.get(f"{base}/stream?bytes={n}") as r:
            async for chunk in r.content.iter_any():
                h.update(chunk)
                got += len(chunk)
        down_s, down_peak = time.monotonic() - t0, peak["value"]
        ok = got == n and h.hexdigest() == expected
        failures += not ok
        print(f"download: {'ok' if ok else 'HASH MISMATCH'} {n / down_s / 2**20:.0f} MiB/s, "
              f"peak RSS {down_peak:.1f} MiB (+{down_peak - baseline:.1f})")

        peak["value"] = 0.0
        t0 = time.monotonic()
        async with client.post(f"{base}/upload", data=_body(n)) as r:
            result = json.loads(await r.read())
        up_s, up_peak = time.monotonic() - t0, peak["value"]
        ok = result.get("body_length") == n and result.get("body_sha256") == expected
        failures += not ok
        print(f"upload:   {'ok' if ok else 'HASH MISMATCH'} {n / up_s / 2**20:.0f} MiB/s, "
              f"peak RSS {up_peak:.1f} MiB (+{up_peak - baseline:.1f})")
        stop.set()
        await sampler

    proc.stdin.close()
    await proc.wait()
    await runner.cleanup()
    growth = max(down_peak, up_peak) - baseline
    if growth > limit_mib:
        print(f"FAIL: RSS grew {growth:.1f} MiB > {limit_mib} MiB")
        failures += 1
    else:
        print(f"PASS: RSS grew at most {growth:.1f} MiB (limit {limit_mib} MiB)")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bytes", type=int, default=GIB)
    ap.add_argument("--limit-mib", type=float, default=64.0)
    ap.add_argument("--child", metavar="UPSTREAM_URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/self/status"):
        print("needs Linux /proc", file=sys.stderr)
        return 2
    if args.child:
        asyncio.run(child(args.child))
        return 0
    return asyncio.run(parent(args.bytes, args.limit_mib))


if __name__ == "__main__":
    sys.exit(main())
