"""Bodies stream both ways in bounded memory; size limits; a client that leaves is noticed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
from collections.abc import AsyncIterator

import pytest

from tests.fakes.upstream import CHUNK, pattern, pattern_sha256
from tests.proxy.conftest import GATEWAY_KEY, Gateway, MakeGateway, get

MIB = 1024 * 1024
BIG = 64 * MIB


async def _chunks(n: int) -> AsyncIterator[bytes]:
    for block in pattern(n):
        yield block


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@pytest.mark.parametrize("sized", [False, True])
async def test_64mib_download_streams(gateway: Gateway, sized: bool) -> None:
    before = _peak_rss_mib()
    h, n = hashlib.sha256(), 0
    raw = f"/up/stream?bytes={BIG}" + ("&length=1" if sized else "")
    async with gateway.request("GET", raw) as r:
        assert r.status == 200
        assert r.headers.get("Content-Length") == (str(BIG) if sized else None)
        async for chunk in r.content.iter_chunked(CHUNK):
            h.update(chunk)
            n += len(chunk)
    assert (n, h.hexdigest()) == (BIG, pattern_sha256(BIG))
    # Client, gateway and upstream share this process: holding the body anywhere would
    # raise the peak by 64 MiB.
    assert _peak_rss_mib() - before < 40


async def test_64mib_chunked_upload_streams(gateway: Gateway) -> None:
    before = _peak_rss_mib()
    async with gateway.request("POST", "/up/upload", data=_chunks(BIG)) as r:
        assert r.status == 200
        got = json.loads(await r.read())
    assert (got["body_length"], got["body_sha256"]) == (BIG, pattern_sha256(BIG))
    rec = gateway.upstream.requests[0]
    assert rec.header("Transfer-Encoding") == "chunked"
    assert _peak_rss_mib() - before < 40


async def test_sized_upload_stays_sized(gateway: Gateway) -> None:
    n = 3 * MIB + 7
    async with gateway.request("PUT", "/up/upload", data=_chunks(n),
                               headers={"Content-Length": str(n)}) as r:
        assert r.status == 200
        got = json.loads(await r.read())
    assert (got["body_length"], got["body_sha256"]) == (n, pattern_sha256(n))
    rec = gateway.upstream.requests[0]
    assert rec.header("Content-Length") == str(n)
    assert rec.header("Transfer-Encoding") is None


async def test_small_chunked_upload_is_sent_whole(gateway: Gateway) -> None:
    """A chunked body within the replay buffer is read first and sent with a length."""
    async with gateway.request("POST", "/up/upload", data=_chunks(1000)) as r:
        got = json.loads(await r.read())
    assert (got["body_length"], got["body_sha256"]) == (1000, pattern_sha256(1000))
    assert gateway.upstream.requests[0].header("Content-Length") == "1000"


async def test_413_by_content_length(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(max_body_bytes=1000)
    async with gw.request("POST", "/up/upload", data=b"x" * 1001) as r:
        assert r.status == 413
        assert r.headers["Gateway-Error"] == "payload_too_large"
        assert json.loads(await r.read())["error"] == "payload_too_large"
    assert gw.upstream.requests == []
    assert gw.tokens.leases == 0  # refused before any token work
    async with gw.request("POST", "/up/upload", data=b"x" * 1000) as r:
        assert r.status == 200


async def test_413_chunked_overflow_within_the_replay_buffer(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(max_body_bytes=10_000, replay_body_bytes=64 * 1024)
    async with gw.request("POST", "/up/upload", data=_chunks(20_000)) as r:
        assert r.status == 413
        assert r.headers["Gateway-Error"] == "payload_too_large"
    assert gw.upstream.requests == []


async def test_413_chunked_overflow_while_streaming(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(max_body_bytes=256 * 1024, replay_body_bytes=1024)
    async with gw.request("POST", "/up/upload", data=_chunks(4 * MIB)) as r:
        assert r.status == 413
        assert r.headers["Gateway-Error"] == "payload_too_large"
    # The upstream saw the start of a body that never completed.
    assert [rec.body_length for rec in gw.upstream.requests] == [None]


async def test_client_leaving_while_waiting_cancels_the_upstream_request(gateway: Gateway
                                                                          ) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(get("/up/slow"))
    await writer.drain()
    await gateway.upstream.slow_started.wait()
    writer.close()
    await asyncio.wait_for(gateway.upstream.slow_cancelled.wait(), 10)


async def test_client_leaving_mid_body_closes_the_upstream_connection(gateway: Gateway
                                                                      ) -> None:
    async with gateway.request("GET", "/up/slow-body") as r:
        assert r.status == 200
        await r.content.readexactly(CHUNK)
        await gateway.upstream.slow_started.wait()
        r.close()
    await asyncio.wait_for(gateway.upstream.slow_cancelled.wait(), 10)


async def test_client_leaving_mid_upload_stops_the_upload(gateway: Gateway) -> None:
    gate = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * (256 * 1024)
        await gate.wait()  # never set: the client goes away mid-body
        yield b"b"

    task = asyncio.create_task(
        gateway.session.post(gateway.url("/up/upload"), data=body(),
                             headers={"Authorization": f"Bearer {GATEWAY_KEY}"}))
    await gateway.upstream.received.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(gateway.upstream.body_failed.wait(), 10)
    assert gateway.upstream.requests[0].body_length is None
