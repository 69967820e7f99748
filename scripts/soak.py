"""Soak test: minutes of mixed traffic through a real ``gateway serve`` process while access
tokens expire every few seconds and the authorization server keeps failing on purpose.

Not part of the test suite (it runs for minutes). Loopback only and self-contained: the fake
authorization server and the fake upstream from ``tests/fakes`` run in this process, the
gateway in a child process (so its memory is measured alone), SQLite in a temporary folder.

    python scripts/soak.py                  # 600 s
    python scripts/soak.py --seconds 90     # a short run

Checks, each failing the run (exit 1):

* zero lost connections: every request that was not abandoned on purpose got a complete
  answer (no connection error, timeout or truncated body);
* no 5xx beyond the injected faults: the only 5xx allowed is ``503 token_endpoint_unavailable``
  while a fault is active (or within one token lifetime after it cleared);
* every identity's connection survives (no re-consent needed at the end);
* flat memory: the gateway's RSS in the last quarter of the run is within
  ``--rss-slack-mib`` of its median in the second quarter; open descriptors back to normal;
* a clean drain: SIGTERM, exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import yaml
from aiohttp import web
from yarl import URL

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.tokens.crypto import generate_key  # noqa: E402
from tests.fakes.authserver import FakeAuthServer  # noqa: E402
from tests.fakes.upstream import FakeUpstream  # noqa: E402

PASSWORD = "soak test password"  # noqa: S105 (a throw-away test identity)
KIB = 1024


FAULTS: dict[str, dict[str, Any]] = {
    "500": {"status": 500},
    "503 retry-after": {"status": 503, "headers": {"Retry-After": "1"}},
    "502 html": {"status": 502, "content_type": "text/html", "body": "<html>Bad Gateway</html>"},
    "200 garbage": {"status": 200, "body": b"\x00garbage"},
    "200 html": {"status": 200, "content_type": "text/html", "body": "<html>login</html>"},
}


@dataclass
class Fault:
    kind: str
    started: float
    cleared: float | None = None


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    fivexx: list[tuple[float, int, str]] = field(default_factory=list)
    abandoned: int = 0
    faults: list[Fault] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    fds: list[tuple[float, int]] = field(default_factory=list)


# --------------------------------------------------------------------------- processes


async def serve(app: web.Application) -> tuple[web.AppRunner, URL]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, URL.build(scheme="http", host=host, port=port)


async def gateway_cli(config: Path, *args: str, stdin: str = "") -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, "--config", str(config), cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    out, err = await proc.communicate(stdin.encode())
    if proc.returncode != 0:
        raise SystemExit(f"gateway {' '.join(args)} failed: {err.decode()}")
    return out.decode()


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS in bytes, open descriptors) of process ``pid``."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * KIB
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def wait_ready(url: URL, proc: asyncio.subprocess.Process, within: float = 30) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise SystemExit("gateway serve exited during start")
            try:
                async with s.get(url / "_gateway/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)  # polling a starting process
    raise SystemExit("gateway serve did not become ready")


async def connect(url: URL, name: str) -> None:
    """Log in as ``name`` and run the consent flow against the auto-approving fake."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as b:
        page = await (await b.get(url / "_gateway/login")).text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf, page
        r = await b.post(url / "_gateway/login", allow_redirects=False, data={
            "csrf": csrf.group(1), "name": name, "password": PASSWORD, "next": "/_gateway/"})
        assert r.status == 303, await r.text()
        r = await b.get(url / "_gateway/connect/fake", allow_redirects=False)
        r = await b.get(r.headers["Location"], allow_redirects=False)
        r = await b.get(r.headers["Location"], allow_redirects=False)
        assert r.status == 200, await r.text()


# --------------------------------------------------------------------------- traffic


async def chunks(n: int) -> AsyncIterator[bytes]:
    for _ in range(n // (16 * KIB)):
        yield b"c" * (16 * KIB)


async def one_request(s: aiohttp.ClientSession, url: URL, key: str, rng: random.Random,
                      stats: Stats) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    kind = rng.choices(["get", "post", "stream", "upload", "gzip", "abandon"],
                       [50, 15, 15, 10, 5, 5])[0]
    stats.kinds[kind] += 1
    stats.requests += 1
    try:
        if kind == "get":
            r = await s.get(url / "fake" / "data", params={"n": str(stats.requests)},
                            headers=auth)
            body = await r.read()
        elif kind == "post":
            r = await s.post(url / "fake" / "upload", data=b"p" * 4 * KIB, headers=auth)
            body = await r.read()
        elif kind == "stream":
            r = await s.get(url / "fake" / "stream", params={"bytes": str(256 * KIB)},
                            headers=auth)
            body = await r.read()
            if r.status == 200 and len(body) != 256 * KIB:
                stats.lost.append(f"stream truncated at {len(body)}")
        elif kind == "upload":
            r = await s.put(url / "fake" / "upload", data=chunks(256 * KIB), headers=auth)
            body = await r.read()
            if r.status == 200 and json.loads(body)["body_length"] != 256 * KIB:
                stats.lost.append("upload arrived short")
        elif kind == "gzip":
            r = await s.get(url / "fake" / "gzip", headers=auth)
            body = await r.read()
        else:
            r = await s.get(url / "fake" / "stream", params={"bytes": str(4096 * KIB)},
                            headers=auth)
            await r.content.readexactly(64 * KIB) if r.status == 200 else await r.read()
            r.close()  # abandoned on purpose: not a lost connection
            stats.abandoned += 1
            body = b""
    except (TimeoutError, aiohttp.ClientError) as e:
        stats.lost.append(f"{kind}: {type(e).__name__}: {e}")
        return
    stats.statuses[str(r.status)] += 1
    if r.status >= 500:
        code = r.headers.get("Gateway-Error", "-")
        stats.fivexx.append((time.monotonic(), r.status, code))
    del body


async def client(url: URL, keys: list[str], deadline: float, stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as s:
        while time.monotonic() < deadline:
            await one_request(s, url, rng.choice(keys), rng, stats)


async def injector(auth: FakeAuthServer, deadline: float, every: float, token_timeout: float,
                   stats: Stats, rng: random.Random) -> None:
    """One fault on the token endpoint every ``every`` seconds, of a random kind."""
    kinds = [*FAULTS, "slow", "timeout"]
    while time.monotonic() + every < deadline:
        await asyncio.sleep(every)  # the schedule is the point: faults arrive on a clock
        kind = rng.choice(kinds)
        fault = Fault(kind, time.monotonic())
        stats.faults.append(fault)
        hits = auth.hits["token"]
        n = rng.randint(1, 3)
        if kind in ("slow", "timeout"):
            auth.hold_tokens()
            await asyncio.sleep(token_timeout * (0.5 if kind == "slow" else 1.5))
            auth.release_tokens()
        else:
            spec = FAULTS[kind]
            auth.fail_next(n, **spec)
            with contextlib.suppress(TimeoutError):  # until the provider served the failures
                await asyncio.wait_for(auth.wait_for_hits("token", hits + n),
                                       max(0.1, deadline - time.monotonic()))
        fault.cleared = time.monotonic()


async def sampler(pid: int, deadline: float, stats: Stats, upstream: FakeUpstream) -> None:
    while time.monotonic() < deadline:
        upstream.requests.clear()  # the fake records every request: keep this process small
        rss, fds = proc_status(pid)
        now = time.monotonic() - stats.started
        stats.rss.append((now, rss))
        stats.fds.append((now, fds))
        await asyncio.sleep(1.0)  # a sampling period


# --------------------------------------------------------------------------- checks


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))


def excused(stats: Stats, at: float, lifetime: float) -> bool:
    """A 503 token_endpoint_unavailable while a fault was active (or just after)."""
    return any(f.started <= at <= (f.cleared or at) + lifetime + 1.0 for f in stats.faults)


def quarter(samples: list[tuple[float, int]], q: int) -> list[int]:
    n = len(samples)
    return [v for _, v in samples[n * (q - 1) // 4: n * q // 4]] or [samples[-1][1]]


async def main(args: argparse.Namespace) -> int:
    # The fake upstream complains when the gateway abandons a stream on a client's behalf;
    # that is the behaviour under test, not news.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    rng = random.Random(args.seed)
    stats = Stats()
    work = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    auth = FakeAuthServer(expires_in=args.token_lifetime, rotate_refresh_tokens=True)
    upstream = FakeUpstream()
    auth_runner, auth.url = await serve(auth.app)
    up_runner, up_url = await serve(upstream.app())
    upstream.server = cast(Any, SimpleNamespace(host=up_url.host, port=up_url.port))
    port = args.port
    if port == 0:
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "token_timeout": args.token_timeout,
                   "shutdown_grace": 10},
        "store": {"url": "sqlite:///gateway.db"}, "encryption_key": generate_key(),
        "log_format": "json",
        "providers": {"fake": auth.config_entry(upstream=str(up_url / "api"))}}))
    names = [f"soak{i}" for i in range(args.identities)]
    keys = [(await gateway_cli(config, "identity", "add", n, "--password-stdin",
                               stdin=PASSWORD + "\n")).strip().splitlines()[-1] for n in names]
    log = (work / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=log,
        env={**os.environ, "PYTHONPATH": str(REPO), "GATEWAY_LOG_LEVEL": "WARNING"})
    url = URL(f"http://127.0.0.1:{port}")
    code = 1
    try:
        await wait_ready(url, proc)
        for n in names:
            await connect(url, n)
        token_calls_start = auth.hits["token"]
        stats.started = time.monotonic()
        deadline = stats.started + args.seconds
        await asyncio.gather(
            *(client(url, keys, deadline, stats, args.seed * 1000 + i)
              for i in range(args.clients)),
            injector(auth, deadline, args.fault_every, args.token_timeout, stats, rng),
            sampler(proc.pid, deadline, stats, upstream))
        final = []
        async with aiohttp.ClientSession() as s:
            for k in keys:
                async with s.get(url / "fake" / "final", headers={"Authorization": f"Bearer {k}"}
                                 ) as r:
                    final.append(r.status)
            async with s.get(url / "_gateway/metrics") as r:
                metrics = await r.text()
        rss_end, fds_end = proc_status(proc.pid)
        token_calls = auth.hits["token"] - token_calls_start
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(proc.wait(), 60)
        log.close()
        await auth_runner.cleanup()
        await up_runner.cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    unexpected = [(t, s, c) for t, s, c in stats.fivexx
                  if not (s == 503 and c == "token_endpoint_unavailable"
                          and excused(stats, t, args.token_lifetime))]
    rss_mid = statistics.median(quarter(stats.rss, 2))
    rss_last = max(quarter(stats.rss, 4))
    fds_mid = statistics.median(quarter(stats.fds, 2))
    refreshes = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'gateway_token_refreshes_total\{[^}]*outcome="([^"]+)"[^}]*\} (\S+)', metrics)}
    summary = {
        "seconds": args.seconds, "clients": args.clients, "identities": args.identities,
        "token_lifetime_s": args.token_lifetime, "requests": stats.requests,
        "by_kind": dict(stats.kinds), "statuses": dict(stats.statuses),
        "abandoned_on_purpose": stats.abandoned, "lost": len(stats.lost),
        "lost_examples": stats.lost[:5], "5xx": len(stats.fivexx),
        "5xx_unexpected": len(unexpected), "faults_injected": len(stats.faults),
        "faults_by_kind": dict(Counter(f.kind for f in stats.faults)),
        "token_endpoint_calls": token_calls, "refreshes_by_outcome": refreshes,
        "final_statuses": final,
        "rss_mib": {"start": round(stats.rss[0][1] / 2**20, 1),
                    "q2_median": round(rss_mid / 2**20, 1),
                    "end": round(rss_end / 2**20, 1), "max": round(max(
                        v for _, v in stats.rss) / 2**20, 1),
                    "q4_max": round(rss_last / 2**20, 1)},
        "fds": {"q2_median": fds_mid, "end": fds_end},
        "gateway_exit_code": exit_code,
    }
    checks = {
        "zero lost connections": not stats.lost,
        "no 5xx beyond the injected faults": not unexpected,
        "every connection survived": final == [200] * len(keys),
        "flat memory": rss_last - rss_mid <= args.rss_slack_mib * 2**20,
        "descriptors back to normal": fds_end <= fds_mid + 10,
        "clean drain (exit 0)": exit_code == 0,
        "faults were injected": len(stats.faults) > 0 and token_calls > len(stats.faults),
    }
    summary["checks"] = checks
    print(json.dumps(summary, indent=2))
    if args.json:
        write_json(Path(args.json), summary)
    code = 0 if all(checks.values()) else 1
    print("soak:", "PASSED" if code == 0 else "FAILED " + ", ".join(
        k for k, ok in checks.items() if not ok), file=sys.stderr)
    return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="run time (default 600)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--identities", type=int, default=4)
    p.add_argument("--token-lifetime", type=int, default=4,
                   help="access-token lifetime in seconds (refreshed at half of it)")
    p.add_argument("--token-timeout", type=float, default=2.0,
                   help="server.token_timeout of the gateway")
    p.add_argument("--fault-every", type=float, default=5.0,
                   help="seconds between injected token-endpoint faults")
    p.add_argument("--rss-slack-mib", type=float, default=16.0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the summary here")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary folder (config, database, gateway.log)")
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
