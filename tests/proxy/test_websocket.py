"""WebSocket upgrades: token on the upstream handshake, messages both ways, closes relayed."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.fakes.upstream import DENIED_BODY
from tests.proxy.conftest import AUTH, GATEWAY_KEY, Gateway, MakeGateway, Tokens, raw_request


def _connect(gw: Gateway, raw: str = "/up/ws", protocols: tuple[str, ...] = ()) -> Any:
    return gw.session.ws_connect(gw.url(raw), headers=AUTH, protocols=protocols)


async def test_relays_text_and_binary_with_the_token(gateway: Gateway) -> None:
    async with _connect(gateway, protocols=("superchat", "nope")) as ws:
        assert ws.protocol == "superchat"
        await ws.send_str("héllo")
        assert (await ws.receive(timeout=5)).data == "héllo"
        await ws.send_bytes(b"\x00\xff" * 1000)
        assert (await ws.receive(timeout=5)).data == b"\x00\xff" * 1000
    rec = gateway.upstream.requests[0]
    assert rec.header("Authorization") == "Bearer good-token"
    assert rec.header("Sec-WebSocket-Protocol") == "superchat,nope"
    assert GATEWAY_KEY not in repr(rec.headers)


async def test_upstream_close_code_reaches_the_client(gateway: Gateway) -> None:
    async with _connect(gateway) as ws:
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4001, "bye")


async def test_client_close_code_reaches_the_upstream(gateway: Gateway) -> None:
    async with _connect(gateway) as ws:
        await ws.send_str("ping")
        assert (await ws.receive(timeout=5)).data == "ping"
        await ws.close(code=4002, message=b"done")
    await asyncio.wait_for(gateway.upstream.ws_closed.wait(), 10)
    assert gateway.upstream.ws_close_codes == [4002]
    assert ws.close_code == 4002


async def test_upstream_failure_closes_the_client_with_1014(gateway: Gateway) -> None:
    async with _connect(gateway) as ws:
        await ws.send_str("abort")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.BAD_GATEWAY


async def test_client_vanishing_closes_the_upstream(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write((
        "GET /up/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {GATEWAY_KEY}\r\n\r\n").encode())
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    writer.close()
    await asyncio.wait_for(gateway.upstream.ws_closed.wait(), 10)
    assert gateway.upstream.ws_close_codes == [aiohttp.WSCloseCode.GOING_AWAY]


async def test_handshake_401_refreshes_once(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token="stale", next_token="good-token"))
    async with _connect(gw) as ws:
        await ws.send_str("x")
        assert (await ws.receive(timeout=5)).data == "x"
    assert gw.tokens.rejections == ["stale"]
    assert [r.header("Authorization") for r in gw.upstream.requests] == [
        "Bearer stale", "Bearer good-token"]


def _upgrade(raw: str) -> bytes:
    return (f"GET {raw} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {GATEWAY_KEY}\r\nConnection: close\r\n\r\n").encode()


async def test_handshake_refusal_passes_through(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token="stale"))
    resp = await raw_request(gw.port, _upgrade("/up/ws"))
    assert resp.status == 401
    assert resp.body == DENIED_BODY
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert "Gateway-Error" not in resp.headers


async def test_handshake_redirect_is_returned_not_followed(gateway: Gateway) -> None:
    resp = await raw_request(gateway.port, _upgrade("/up/redirect"))
    assert resp.status == 302
    assert resp.headers["Location"] == "http://gw.example:8080/up/landing"
    assert gateway.upstream.hits("landing") == 0


async def test_handshake_to_unreachable_upstream_is_502(gateway: Gateway) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        async with _connect(gateway, "/down/ws"):
            pass
    assert e.value.status == 502


async def test_broken_client_handshake_is_400(gateway: Gateway) -> None:
    head = (f"GET /up/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Authorization: Bearer {GATEWAY_KEY}\r\nConnection: close\r\n\r\n").encode()
    resp = await raw_request(gateway.port, head)
    assert resp.status == 400
    assert resp.headers["Gateway-Error"] == "bad_request"
    assert gateway.upstream.requests == []
