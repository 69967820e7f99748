"""A failing or malicious upstream (SPEC invariants 3 and 4; RFC 9110 §15.6.3/§15.6.5).

Before the response has started, a broken upstream is the gateway's own, mapped answer
(502 ``upstream_unreachable``, 504 ``upstream_timeout``) with Gateway-Error; once it has
started, the client connection is cut so a truncated body can never pass for a whole one.
A slow but alive stream passes complete. An upstream cannot make the gateway hold unbounded
headers, follow a redirect, or answer in its name.

Through the whole app. tests/proxy/test_forwarding.py covers the same mapping on the proxy
alone (refused, reset before the answer, reset mid-body, timeouts, redirects returned not
followed, hop-by-hop and gateway cookies stripped).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.security.conftest import SecureGateway

READ_TIMEOUT = 0.3
MIB = 1024 * 1024


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A bound, never-listening socket: connecting to it is refused, reliably."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


async def _gateway(secure_gateway: Any, **kw: Any) -> SecureGateway:
    gw: SecureGateway = await secure_gateway(
        config={"server": {"read_timeout": READ_TIMEOUT, "connect_timeout": 1.0,
                           "max_body_bytes": 8 * MIB}}, **kw)
    await gw.connect_alice(("fake", "rec"))
    return gw


async def _chunks(n: int) -> Any:
    for _ in range(n // 65536):
        yield b"u" * 65536


def _mapped(status: int, headers: Any, code: str) -> None:
    assert status in (502, 504), status
    assert headers.get("Gateway-Error") == code, dict(headers)


async def test_refusing_upstream_is_502(secure_gateway: Any, refused_port: int) -> None:
    gw = await _gateway(secure_gateway,
                        provider={"upstream": f"http://127.0.0.1:{refused_port}/api"})
    async with aiohttp.ClientSession() as s, \
            s.get(gw.url / "fake" / "x", headers=gw.auth_header) as r:
        _mapped(r.status, r.headers, "upstream_unreachable")
        body = await r.text()
    assert str(refused_port) not in body  # the upstream's address is not the client's business


async def test_reset_mid_request_is_502_and_the_upload_stops(secure_gateway: Any) -> None:
    gw = await _gateway(secure_gateway)
    assert gw.rec is not None
    gw.rec.mode, gw.rec.reset_after = "reset_upload", 128 * 1024
    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(gw.url / "rec" / "upload", data=_chunks(4 * MIB),
                              headers=gw.auth_header) as r:
                _mapped(r.status, r.headers, "upstream_unreachable")
        except aiohttp.ClientError:
            pass  # the gateway may also close on the client while it is still uploading
    assert gw.rec.body_closed.is_set()
    assert len(gw.rec.hits) == 1  # not retried: a non-idempotent body is never replayed


async def test_reset_mid_response_truncates_the_client(secure_gateway: Any) -> None:
    gw = await _gateway(secure_gateway)
    async with aiohttp.ClientSession() as s, \
            s.get(gw.url / "fake" / "reset-mid-body", headers=gw.auth_header) as r:
        assert r.status == 200  # the upstream's own status had already been passed on
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_a_slow_drip_within_the_read_timeout_passes_complete(secure_gateway: Any) -> None:
    gw = await _gateway(secure_gateway)
    assert gw.rec is not None
    gw.rec.mode, gw.rec.drip_bytes, gw.rec.drip_interval = "drip", 15, READ_TIMEOUT / 5
    async with aiohttp.ClientSession() as s, \
            s.get(gw.url / "rec" / "drip", headers=gw.auth_header) as r:
        assert r.status == 200
        assert await r.read() == b"." * 15


async def test_a_drip_slower_than_the_read_timeout_is_cut_off(secure_gateway: Any) -> None:
    gw = await _gateway(secure_gateway)
    assert gw.rec is not None
    gw.rec.mode, gw.rec.drip_bytes, gw.rec.drip_interval = "drip", 10, READ_TIMEOUT * 4
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, \
            s.get(gw.url / "rec" / "drip", headers=gw.auth_header) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert time.monotonic() - started < READ_TIMEOUT * 4 + 2.0


@pytest.mark.parametrize("mode", ["garbage", "huge_header", "many_headers"])
async def test_a_malformed_or_bloated_answer_is_502(secure_gateway: Any, mode: str) -> None:
    gw = await _gateway(secure_gateway)
    assert gw.rec is not None
    gw.rec.mode, gw.rec.huge = mode, (64 * 1024 if mode == "huge_header" else 1000)
    async with aiohttp.ClientSession() as s, \
            s.get(gw.url / "rec" / "x", headers=gw.auth_header) as r:
        _mapped(r.status, r.headers, "upstream_unreachable")
        body = await r.text()
    assert "THIS IS NOT HTTP" not in body and "hhhh" not in body


async def test_a_redirect_elsewhere_is_returned_not_followed(secure_gateway: Any) -> None:
    gw = await _gateway(secure_gateway)
    assert gw.rec is not None and gw.two is not None
    gw.rec.mode = "location"
    gw.rec.location = f"http://{gw.two.authority}/b/steal"
    async with aiohttp.ClientSession() as s, \
            s.get(gw.url / "rec" / "x", headers=gw.auth_header, allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == gw.rec.location
        assert "Gateway-Error" not in r.headers
    assert gw.two.hits == []  # the gateway never went there, with or without the token
