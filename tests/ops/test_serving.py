"""`gateway serve --workers N` as real processes: crash recovery, draining on SIGTERM,
reloading on SIGHUP (and `gateway reload`), metrics summed over workers."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.cli import open_store
from gateway.config import load_config
from gateway.identities import IdentityService
from tests.fakes.authserver import FakeAuthServer, start_auth_server
from tests.fakes.upstream import FakeUpstream, start_upstream
from tests.ops.conftest import REPO, ServedGateway, base_config, free_port, sample

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _provider(fake: FakeAuthServer, upstream: FakeUpstream) -> dict[str, Any]:
    """No consent needed: a client-credentials provider, so any worker can proxy at once."""
    return {**fake.config_entry(upstream=str(upstream.url / "api")),
            "grant": "client_credentials"}


async def _setup(tmp_path: Path, aiohttp_server: Any, encryption_key: str,
                 **server: Any) -> tuple[dict[str, Any], str, FakeAuthServer, FakeUpstream]:
    fake = await start_auth_server(aiohttp_server)
    upstream = await start_upstream(aiohttp_server)
    config = base_config(encryption_key, free_port(), {"fake": _provider(fake, upstream)},
                         **server)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    async with open_store(load_config(path, env={})) as (store, box):
        _, key = await IdentityService(store, box).add_identity("alice")
    return config, key, fake, upstream


def _msg(text: str) -> Any:
    return lambda line: text in str(line.get("msg", ""))


async def _log(gw: ServedGateway, text: str, count: int = 1, start: int = 0) -> list[Any]:
    return await asyncio.to_thread(gw.wait_log, _msg(text), count, 30.0, start)


def _worker_pids(lines: list[dict[str, Any]]) -> list[int]:
    return [int(ln["msg"].rsplit(" ", 1)[1]) for ln in lines]


def _proxied(gw: ServedGateway, key: str, path: str) -> tuple[int, dict[str, str], bytes]:
    return gw.get(path, headers={"Authorization": f"Bearer {key}"})


async def test_a_killed_worker_is_replaced_and_metrics_span_workers(
        serve: Any, tmp_path: Path, aiohttp_server: Any, encryption_key: str) -> None:
    config, key, _, _ = await _setup(tmp_path, aiohttp_server, encryption_key)
    gw: ServedGateway = serve(config, workers=2)
    await asyncio.to_thread(gw.wait_ready)
    first = _worker_pids(await _log(gw, "started worker", 2))
    await _log(gw, "is serving", 2)
    assert int(gw.pidfile.read_text()) == gw.proc.pid  # the parent's pid
    probes = await asyncio.to_thread(gw.pids_serving, set(first))
    assert set(probes) == set(first)  # both workers answer on the one port

    victim, survivor = first
    os.kill(victim, signal.SIGKILL)
    await _log(gw, f"worker {victim} exited with code -9; starting a replacement")
    [replacement] = _worker_pids(await _log(gw, "started worker", 3))[2:]
    await _log(gw, f"worker {replacement} is serving")
    more = await asyncio.to_thread(gw.pids_serving, {survivor, replacement})
    assert set(more) == {survivor, replacement}
    for _ in range(6):  # proxying works whichever worker takes the connection
        status, _, body = await asyncio.to_thread(_proxied, gw, key, "/fake/stream?bytes=16")
        assert status == 200 and len(body) == 16, (body, gw.log_text())

    # Any worker's scrape sums every worker's counters (the dead one's included): more
    # health probes than any one worker answered. A request is counted just after its last
    # byte went out, so poll briefly for the last proxied one.
    probed = sum(probes.values()) + sum(more.values())
    agreeing = 0
    for _ in range(200):
        status, _, text = await asyncio.to_thread(gw.get, "/_gateway/metrics")
        assert status == 200, gw.log_text()
        total = sample(text.decode(), "gateway_requests_total", provider="fake")
        assert total <= 6
        if total == 6:
            assert sample(text.decode(), "gateway_requests_total", provider="_gateway",
                          method="GET", status_class="2xx") >= probed
            agreeing += 1
            if agreeing == 2:
                break
    assert agreeing == 2, gw.log_text()
    assert await asyncio.to_thread(gw.stop) == 0
    assert not gw.pidfile.exists()


async def test_sigterm_drains_the_request_in_flight_then_exits_0(
        serve: Any, tmp_path: Path, aiohttp_server: Any, encryption_key: str) -> None:
    config, key, _, upstream = await _setup(tmp_path, aiohttp_server, encryption_key)
    gw: ServedGateway = serve(config, workers=2)
    await asyncio.to_thread(gw.wait_ready)
    await _log(gw, "is serving", 2)
    async with aiohttp.ClientSession() as c:
        slow = asyncio.create_task(c.get(gw.url / "fake/slow",
                                         headers={"Authorization": f"Bearer {key}"}))
        await upstream.slow_started.wait()
        _, _, text = await asyncio.to_thread(gw.get, "/_gateway/metrics")
        assert sample(text.decode(), "gateway_requests_in_flight") == 2  # slow + this scrape

        mark = gw.mark()
        gw.signal(signal.SIGTERM)
        await _log(gw, "shutting down: draining", 2, start=mark)

        def refused() -> bool:
            for _ in range(500):
                try:
                    gw.get("/_gateway/healthz", timeout=1.0)
                except ConnectionRefusedError:
                    return True
                except OSError:
                    continue
            return False

        assert await asyncio.to_thread(refused)  # no new connections while draining
        assert gw.proc.poll() is None and not slow.done()  # the slow request is still held
        upstream.release.set()
        r = await slow
        assert r.status == 200 and await r.text() == "finally"
    assert await asyncio.to_thread(gw.proc.wait, 30) == 0
    await _log(gw, "all workers stopped")


async def test_sigterm_cuts_requests_off_after_the_grace_period(
        serve: Any, tmp_path: Path, aiohttp_server: Any, encryption_key: str) -> None:
    config, key, _, upstream = await _setup(tmp_path, aiohttp_server, encryption_key,
                                            shutdown_grace=0.5)
    gw: ServedGateway = serve(config, workers=1)
    await asyncio.to_thread(gw.wait_ready)
    assert int(gw.pidfile.read_text()) == gw.proc.pid  # written once serving
    async with aiohttp.ClientSession() as c:
        slow = asyncio.create_task(c.get(gw.url / "fake/slow",
                                         headers={"Authorization": f"Bearer {key}"}))
        await upstream.slow_started.wait()
        gw.signal(signal.SIGTERM)
        assert await asyncio.to_thread(gw.proc.wait, 30) == 0
        with pytest.raises(aiohttp.ClientError):
            await slow
    assert not upstream.release.is_set()
    assert not gw.pidfile.exists()
    await upstream.slow_cancelled.wait()  # the upstream request was given up, not leaked


def _reload_cli(gw: ServedGateway) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "reload", "--config", str(gw.config_path),
         "--pidfile", str(gw.pidfile)], capture_output=True, text=True, timeout=30, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def _same_connection(gw: ServedGateway, key: str, pid: int, path: str) -> int | None:
    """Find a connection served by worker ``pid``; return the status of ``path`` on it."""
    for _ in range(300):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
        try:
            conn.request("GET", "/_gateway/healthz")
            resp = conn.getresponse()
            if json.loads(resp.read())["pid"] != pid:
                continue
            conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()
    return None


async def test_sighup_reloads_providers_and_refuses_a_broken_config(
        serve: Any, tmp_path: Path, aiohttp_server: Any, encryption_key: str) -> None:
    config, key, fake, upstream = await _setup(tmp_path, aiohttp_server, encryption_key)
    gw: ServedGateway = serve(config, workers=2)
    await asyncio.to_thread(gw.wait_ready)
    await _log(gw, "is serving", 2)
    status, _, body = await asyncio.to_thread(_proxied, gw, key, "/second/stream?bytes=3")
    assert status == 404 and b"unknown_provider" in body

    config["providers"]["second"] = _provider(fake, upstream)
    gw.config_path.write_text(yaml.safe_dump(config))
    mark = gw.mark()
    done = await asyncio.to_thread(_reload_cli, gw)
    assert done.returncode == 0, done.stderr
    reloaded = await _log(gw, "config reloaded", 2, start=mark)
    assert all("added: second" in ln["msg"] for ln in reloaded)
    assert len({ln["pid"] for ln in reloaded}) == 2  # each worker reloaded itself
    for _ in range(6):
        status, _, body = await asyncio.to_thread(_proxied, gw, key, "/second/stream?bytes=3")
        assert status == 200 and len(body) == 3

    # A broken file: `gateway reload` refuses it up front; a raw SIGHUP is refused by the
    # server with one clear line, and everything keeps working with the old providers.
    gw.config_path.write_text("providers: [oops\n")
    done = await asyncio.to_thread(_reload_cli, gw)
    assert done.returncode == 2 and "not valid YAML" in done.stderr
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    [refused] = await _log(gw, "config reload refused", start=mark)
    assert str(gw.config_path) in refused["msg"] and refused["level"] == "error"
    assert refused["pid"] == gw.proc.pid  # the parent refused it; the workers were not told
    for _ in range(6):
        status, _, _ = await asyncio.to_thread(_proxied, gw, key, "/second/stream?bytes=3")
        assert status == 200

    # A worker started after the reload serves the reloaded providers too.
    victim = reloaded[0]["pid"]
    mark = gw.mark()
    os.kill(victim, signal.SIGKILL)
    [started] = await _log(gw, "started worker", start=mark)
    replacement = int(started["msg"].rsplit(" ", 1)[1])
    await _log(gw, f"worker {replacement} is serving", start=mark)
    status = await asyncio.to_thread(_same_connection, gw, key, replacement,
                                     "/second/stream?bytes=3")
    assert status == 200
    assert not any("config reloaded" in str(ln.get("msg")) for ln in gw.lines[mark:])
    assert await asyncio.to_thread(gw.stop) == 0


async def test_reload_without_a_running_gateway_fails_clearly(tmp_path: Path,
                                                              encryption_key: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base_config(encryption_key, free_port(), {})))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "gateway", "reload", "--config", str(path)]
    done = await asyncio.to_thread(subprocess.run, run, capture_output=True, text=True,
                                   timeout=30, cwd=REPO, env=env)
    assert done.returncode == 1 and "no pidfile" in done.stderr
    (tmp_path / "gateway.pid").write_text("999999999\n")
    done = await asyncio.to_thread(subprocess.run, run, capture_output=True, text=True,
                                   timeout=30, cwd=REPO, env=env)
    assert done.returncode == 1 and "not running" in done.stderr


async def test_workers_that_cannot_start_are_retried_with_backoff(
        serve: Any, tmp_path: Path, aiohttp_server: Any, encryption_key: str) -> None:
    config, _, _, _ = await _setup(tmp_path, aiohttp_server, encryption_key)
    import socket

    squatter = socket.socket()  # holds the port without SO_REUSEPORT: workers cannot bind
    squatter.bind(("127.0.0.1", config["server"]["port"]))
    squatter.listen()
    try:
        gw: ServedGateway = serve(config, workers=2)
        [cannot] = await _log(gw, "worker cannot serve")
        assert "address already in use" in cannot["msg"].lower()
        await _log(gw, "starting a replacement in 1s")  # backing off, not spinning
    finally:
        squatter.close()
    await asyncio.to_thread(gw.wait_ready)  # once the port is free, workers come up
    await _log(gw, "is serving", 2)
    assert await asyncio.to_thread(gw.stop) == 0


async def test_a_short_admin_key_is_a_config_error_before_serving(tmp_path: Path,
                                                                  encryption_key: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base_config(encryption_key, free_port(), {})))
    env = {**os.environ, "PYTHONPATH": str(REPO), "GATEWAY_ADMIN_KEY": "too-short"}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", "serve", "--workers", "2",
                         "--config", str(path)],
        capture_output=True, text=True, timeout=30, cwd=REPO, env=env)
    assert done.returncode == 2 and "GATEWAY_ADMIN_KEY" in done.stderr
    assert "too-short" not in done.stderr
