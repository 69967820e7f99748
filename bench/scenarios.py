"""The measurements that are not a wrk run: streaming, the refresh storm, start-up time.

Each takes ports and keys of servers the caller started and returns a plain dict for the
report. Clients here are aiohttp (streaming, storm) or blocking probes (start-up).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import PYTHON, ROOT, Server, rss_mib, taskset, wait_http, wait_workers
from tests.fakes.upstream import pattern, pattern_sha256

MIB = 2**20


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# --------------------------------------------------------------------------- streaming


class _Sampler:
    """Peak RSS of one process, sampled every 20 ms while running."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            try:
                await asyncio.wait_for(self._stop.wait(), 0.02)
            except TimeoutError:
                pass
        self.peak = max(self.peak, rss_mib(self.pid))


async def _pattern_body(n: int) -> AsyncIterator[bytes]:
    for block in pattern(n):
        yield block


async def stream(port: int, key: str, pid: int, n: int) -> dict[str, Any]:
    """Download and upload ``n`` bytes through the gateway's ``stream`` provider; content
    checked by SHA-256, the serving process's RSS sampled throughout."""
    base = f"http://127.0.0.1:{port}/stream"
    auth = {"Authorization": f"Bearer {key}"}
    expected = pattern_sha256(n)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as client:
        for _ in range(2):  # warm: pools, buffers, the token cache
            async with client.get(f"{base}/stream?bytes={MIB}", headers=auth) as r:
                await r.read()
            async with client.post(f"{base}/upload", data=_pattern_body(MIB), headers=auth) as r:
                await r.read()
        baseline = rss_mib(pid)
        out: dict[str, Any] = {"bytes": n, "baseline_rss_mib": round(baseline, 1)}

        async with _Sampler(pid) as sampler:
            t0 = time.perf_counter()
            h, got = hashlib.sha256(), 0
            async with client.get(f"{base}/stream?bytes={n}", headers=auth) as r:
                status = r.status
                async for chunk in r.content.iter_any():
                    h.update(chunk)
                    got += len(chunk)
            seconds = time.perf_counter() - t0
        out["download"] = _leg(status == 200 and got == n and h.hexdigest() == expected,
                               n, seconds, sampler.peak, baseline)

        async with _Sampler(pid) as sampler:
            t0 = time.perf_counter()
            async with client.post(f"{base}/upload", data=_pattern_body(n), headers=auth) as r:
                status, body = r.status, await r.read()
            seconds = time.perf_counter() - t0
        try:
            echo = json.loads(body)
        except ValueError:
            echo = {}
        ok = (status == 200 and echo.get("body_length") == n
              and echo.get("body_sha256") == expected)
        out["upload"] = _leg(ok, n, seconds, sampler.peak, baseline)
    out["rss_growth_mib"] = max(out["download"]["rss_growth_mib"],
                                out["upload"]["rss_growth_mib"])
    return out


def _leg(ok: bool, n: int, seconds: float, peak: float, baseline: float) -> dict[str, Any]:
    return {"ok": ok, "seconds": round(seconds, 2), "mib_per_s": round(n / seconds / MIB, 1),
            "peak_rss_mib": round(peak, 1), "rss_growth_mib": round(peak - baseline, 1)}


# --------------------------------------------------------------------------- refresh storm


async def _token_hits(token_port: int, session: aiohttp.ClientSession) -> int:
    async with session.get(f"http://127.0.0.1:{token_port}/bench/hits") as r:
        return int((await r.json())["hits"].get("token", 0))


async def _burst(session: aiohttp.ClientSession, url: str, key: str,
                 n: int) -> tuple[list[float], dict[int, int], float]:
    auth = {"Authorization": f"Bearer {key}"}
    start = asyncio.Event()
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def one() -> None:
        await start.wait()
        t0 = time.perf_counter()
        try:
            async with session.get(url, headers=auth) as r:
                await r.read()
                status = r.status
        except aiohttp.ClientError:
            status = 0
        latencies.append(time.perf_counter() - t0)
        statuses[status] = statuses.get(status, 0) + 1

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.sleep(0)  # every task is now waiting on the start line
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return latencies, statuses, time.perf_counter() - t0


def _summary(latencies: list[float], statuses: dict[int, int], wall: float) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {"statuses": {str(k): v for k, v in sorted(statuses.items())},
            "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1), "wall_ms": round(wall * 1000, 1)}


async def storm(port: int, key: str, token_port: int, n: int, warm_key: str) -> dict[str, Any]:
    """``n`` concurrent requests on an expired token (connections opened beforehand, so
    they arrive together), then the same burst again on the now fresh token. A first burst
    as ``warm_key`` (an identity with a fresh token for the same provider) fills the
    gateway's upstream pool, so both measured bursts find it in the same state."""
    url = f"http://127.0.0.1:{port}/bench/small"
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(_warm(session, port) for _ in range(n)))
        await _burst(session, url, warm_key, n)
        before = await _token_hits(token_port, session)
        expired = _summary(*await _burst(session, url, key, n))
        middle = await _token_hits(token_port, session)
        fresh = _summary(*await _burst(session, url, key, n))
        after = await _token_hits(token_port, session)
    return {"requests": n, "token_calls": middle - before, "expired": expired,
            "fresh": fresh, "token_calls_fresh": after - middle}


async def _warm(session: aiohttp.ClientSession, port: int) -> None:
    async with session.get(f"http://127.0.0.1:{port}/_gateway/healthz") as r:
        await r.read()


# --------------------------------------------------------------------------- start-up


def startup(config: Path, port: int, key: str, workers: int, reps: int, log: Path,
            cpus: Sequence[int] | None) -> dict[str, Any]:
    """Spawn ``gateway serve`` ``reps`` times: seconds to the first 200 from healthz, to the
    first proxied 200 and (with workers) until every worker answers."""
    health, proxied, all_up = [], [], []
    for _ in range(reps):
        cmd = [PYTHON, "-m", "gateway", "serve", "--config", str(config), "--workers",
               str(workers)]
        server = Server(f"gateway --workers {workers}", taskset(cmd, cpus), log)
        try:
            health.append(wait_http(server, port, "/_gateway/healthz"))
            proxied.append(wait_http(server, port, "/bench/small",
                                     headers={"Authorization": f"Bearer {key}"}))
            if workers > 1:
                wait_workers(server, port, "/_gateway/healthz", workers)
                all_up.append(time.perf_counter() - server.started_at)
        finally:
            server.stop()
    out: dict[str, Any] = {"workers": workers, "reps": reps,
                           "healthz_s": round(statistics.median(health), 3),
                           "first_proxied_s": round(statistics.median(proxied), 3),
                           "healthz_all_s": [round(x, 3) for x in health],
                           "first_proxied_all_s": [round(x, 3) for x in proxied]}
    if all_up:
        out["all_workers_s"] = round(statistics.median(all_up), 3)
    return out


def interpreter_costs() -> dict[str, float]:
    """Seconds for a bare interpreter start and for one that imports the gateway's app."""

    def timed(code: str) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([PYTHON, "-c", code], cwd=ROOT, check=True)
            best = min(best, time.perf_counter() - t0)
        return round(best, 3)

    return {"python_s": timed("pass"), "import_gateway_app_s": timed("import gateway.app"),
            "import_gateway_serving_s": timed("import gateway.app, gateway.serving")}
