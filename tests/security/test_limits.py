"""Resource limits: sane defaults, configurable, and a 4xx (never a 5xx, never a hang) when a
client goes past them (RFC 9110 §15.5.14/§15.5.15 and RFC 6585 §4/§5 in spirit; aiohttp's
parser answers 400 for all of its own limits).

* request target (``server.max_url_bytes``), one header field (``server.max_header_bytes``),
  header count (``server.max_headers``): refused by the HTTP parser, nothing reaches the app;
* body (``server.max_body_bytes``): 413 ``payload_too_large`` by Content-Length or mid-stream
  (tests/proxy/test_streaming.py covers the streaming cases on the proxy alone);
* requests in flight per identity (``server.max_concurrent_per_identity``): 429
  ``rate_limited`` with Retry-After, other identities unaffected, slots always given back;
* pending authorizations per identity (20): 429 with Retry-After, nothing more stored.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.config import ServerConfig
from gateway.limits import InFlightLimiter, parser_limits
from gateway.web.consent import MAX_PENDING_PER_IDENTITY
from tests.security.conftest import (
    PASSWORD,
    SecureGateway,
    db_rows,
    raw_exchange,
    request_bytes,
    settle,
)

REPO = Path(__file__).resolve().parents[2]
LIMITS = {"max_url_bytes": 1024, "max_header_bytes": 1024, "max_headers": 20,
          "max_body_bytes": 1024 * 1024, "max_concurrent_per_identity": 3}


async def _limited(secure_gateway: Any) -> SecureGateway:
    gw: SecureGateway = await secure_gateway(config={"server": LIMITS})
    await gw.connect_alice(("fake", "rec"))
    return gw


def _get(gw: SecureGateway, target: str, headers: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
    return request_bytes("GET", target, [("Host", "gw"), ("Authorization", f"Bearer {gw.key}"),
                                         *headers, ("Connection", "close")])


def test_defaults_are_sane() -> None:
    s = ServerConfig()
    assert s.max_url_bytes == 8190 and s.max_header_bytes == 8190 and s.max_headers == 128
    assert s.max_body_bytes == 100 * 1024 * 1024 and s.max_concurrent_per_identity == 256
    assert parser_limits(s) == {"max_line_size": 8190 + 32, "max_field_size": 8190,
                                "max_headers": 128}


async def test_url_length(secure_gateway: Any) -> None:
    gw = await _limited(secure_gateway)
    assert gw.rec is not None
    ok = await raw_exchange(gw.port, _get(gw, "/rec/" + "a" * 900))
    assert ok is not None and ok.status == 200
    hits = len(gw.rec.hits)
    long = await raw_exchange(gw.port, _get(gw, "/rec/" + "a" * 1100))
    assert long is not None and long.status == 400
    assert len(gw.rec.hits) == hits


async def test_header_size_and_count(secure_gateway: Any) -> None:
    gw = await _limited(secure_gateway)
    assert gw.rec is not None
    ok = await raw_exchange(gw.port, _get(gw, "/rec/x", [("X-Big", "b" * 900)]
                                          + [(f"X-{i}", "v") for i in range(12)]))
    assert ok is not None and ok.status == 200
    hits = len(gw.rec.hits)
    big = await raw_exchange(gw.port, _get(gw, "/rec/x", [("X-Big", "b" * 1100)]))
    many = await raw_exchange(gw.port, _get(gw, "/rec/x", [(f"X-{i}", "v") for i in range(25)]))
    for answer in (big, many):
        assert answer is not None and answer.status == 400
    assert len(gw.rec.hits) == hits


async def test_body_size_with_the_default_config_is_413(secure_gateway: Any) -> None:
    """No body limit configured: the default applies (it used to be a dataclass descriptor,
    and every request with a body answered 500)."""
    gw: SecureGateway = await secure_gateway()
    await gw.connect_alice(("fake",))
    too_big = request_bytes("POST", "/fake/upload", [
        ("Host", "gw"), ("Authorization", f"Bearer {gw.key}"),
        ("Content-Length", str(200 * 1024 * 1024)), ("Connection", "close")])
    answer = await raw_exchange(gw.port, too_big, until_close=False)
    assert answer is not None and answer.status == 413
    assert answer.headers["Gateway-Error"] == "payload_too_large"
    async with aiohttp.ClientSession() as s, \
            s.post(gw.url / "fake" / "upload", data=b"x" * 1000, headers=gw.auth_header) as r:
        assert r.status == 200


async def test_body_size_configured(secure_gateway: Any) -> None:
    gw = await _limited(secure_gateway)

    async def body() -> Any:
        for _ in range(40):
            yield b"z" * 65536  # 2.5 MiB, chunked

    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url / "fake" / "upload", data=io.BytesIO(b"x" * 2 * 1024 * 1024),
                          headers=gw.auth_header) as r:
            assert r.status == 413 and r.headers["Gateway-Error"] == "payload_too_large"
        try:
            async with s.post(gw.url / "fake" / "upload", data=body(),
                              headers=gw.auth_header) as r:
                assert r.status == 413
        except aiohttp.ClientError:
            pass  # cut off while still sending: also refused, and nothing was accepted


async def test_concurrent_requests_per_identity(secure_gateway: Any) -> None:
    gw = await _limited(secure_gateway)
    bob_key = await gw.identity("bob", PASSWORD)
    assert (await gw.connect("bob", PASSWORD, "fake")).status == 200
    inflight = gw.services.inflight
    assert isinstance(inflight, InFlightLimiter)
    async with aiohttp.ClientSession() as s:
        held = [asyncio.create_task(s.get(gw.url / "fake" / "slow", headers=gw.auth_header))
                for _ in range(3)]
        assert await settle(lambda: gw.upstream.hits("slow") == 3)
        async with s.get(gw.url / "fake" / "x", headers=gw.auth_header) as r:
            assert r.status == 429 and r.headers["Gateway-Error"] == "rate_limited"
            assert int(r.headers["Retry-After"]) >= 1
        async with s.get(gw.url / "fake" / "x",
                         headers={"Authorization": f"Bearer {bob_key}"}) as r:
            assert r.status == 200  # one identity's burst does not starve another
        held[0].cancel()  # a client that gives up gives its slot back too
        gw.upstream.release.set()
        for task in held[1:]:
            async with await task as r:
                assert r.status == 200
        assert await settle(lambda: inflight.in_flight() == 0)
        async with s.get(gw.url / "fake" / "x", headers=gw.auth_header) as r:
            assert r.status == 200
    assert inflight.in_flight() == 0


async def test_pending_authorizations_per_identity(secure_gateway: Any) -> None:
    gw: SecureGateway = await secure_gateway()
    await gw.identity("alice", PASSWORD)
    await gw.identity("bob", PASSWORD)
    browser, other = gw.client(), gw.client()
    assert (await gw.login(browser, "alice", PASSWORD)).status == 303
    assert (await gw.login(other, "bob", PASSWORD)).status == 303
    for _ in range(MAX_PENDING_PER_IDENTITY):
        start = await browser.get(gw.url / "_gateway/connect/fake", allow_redirects=False)
        assert start.status == 302
    stored = db_rows(gw.db_path)["pending_authorizations"]
    refused = await browser.get(gw.url / "_gateway/connect/fake", allow_redirects=False)
    assert refused.status == 429 and refused.headers["Gateway-Error"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert db_rows(gw.db_path)["pending_authorizations"] == stored
    ok = await other.get(gw.url / "_gateway/connect/fake", allow_redirects=False)
    assert ok.status == 302


def _serve(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config),
                             "--pidfile", str(config.with_name("gw.pid"))], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
async def test_gateway_serve_applies_the_parser_limits(tmp_path: Path,
                                                       encryption_key: str) -> None:
    """The limits reach the real server (gateway.serving), not only the test harness."""
    port = _free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, **LIMITS},
        "store": {"url": "sqlite:///gw.db"}, "encryption_key": encryption_key,
        "providers": {}}))
    proc = _serve(config)
    try:
        async def up() -> bool:
            try:
                answer = await raw_exchange(port, request_bytes(
                    "GET", "/_gateway/healthz", [("Host", "gw"), ("Connection", "close")]))
            except OSError:
                return False
            return answer is not None and answer.status == 200

        for _ in range(200):
            if await up():
                break
            assert proc.poll() is None, "gateway serve exited"
            await asyncio.sleep(0.05)  # polling a starting process: no event to wait on
        else:
            raise AssertionError("gateway serve did not come up")
        short = await raw_exchange(port, request_bytes(
            "GET", "/_gateway/" + "a" * 900, [("Host", "gw"), ("Connection", "close")]))
        long = await raw_exchange(port, request_bytes(
            "GET", "/_gateway/" + "a" * 1100, [("Host", "gw"), ("Connection", "close")]))
        many = await raw_exchange(port, request_bytes(
            "GET", "/_gateway/healthz", [("Host", "gw"), *((f"X-{i}", "v") for i in range(25)),
                                         ("Connection", "close")]))
        assert short is not None and short.status == 404  # reached the app
        assert long is not None and long.status == 400
        assert many is not None and many.status == 400
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
