"""Clients that go away mid-request leak nothing (a slow-loris or a flaky network must not
exhaust the gateway's sockets, tasks or upstream pool).

1,000 aborted requests against the whole app, 50 at a time, in three shapes: uploads that
stop after part of a 1 MiB body (the body is already streaming upstream), downloads read for
64 KiB of an 8 MiB stream, and requests abandoned while the upstream has not answered yet;
half of the clients close politely (FIN), half reset (RST). Afterwards, polled to a bound
(no fixed sleeps): no connection left open at the gateway, none in use in its upstream pool,
asyncio tasks back to the baseline, and open file descriptors back to the baseline plus the
idle keep-alive connections the pool may legitimately keep (two descriptors each: both ends
live in this process).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import aiohttp
import pytest

from tests.security.conftest import (
    SecureGateway,
    connector_counts,
    open_fds,
    server_connections,
    settle,
)

ABORTS = 1000
CONCURRENCY = 50
MIB = 1024 * 1024


def _head(gw: SecureGateway, method: str, target: str, extra: str = "") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gw.key}\r\n"
            f"{extra}\r\n").encode()


async def _close(writer: asyncio.StreamWriter, reset: bool) -> None:
    if reset:
        writer.transport.abort()
    else:
        writer.close()
    await asyncio.sleep(0)  # (let the transport finish closing on this loop turn)


async def _upload(gw: SecureGateway, reset: bool, ordinal: int) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(_head(gw, "POST", "/fake/upload", f"Content-Length: {MIB}\r\n"))
    writer.write(b"u" * (100 * 1024))  # past the 64 KiB replay buffer: streams at once
    await writer.drain()
    # Leave once this upload (or a later one) is streaming into the upstream.
    assert await settle(lambda: gw.upstream.hits("upload") >= ordinal, within=20)
    await _close(writer, reset)


async def _download(gw: SecureGateway, reset: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(_head(gw, "GET", f"/fake/stream?bytes={8 * MIB}"))
    await writer.drain()
    got = 0
    while got < 64 * 1024:
        chunk = await reader.read(65536)
        assert chunk, "the stream ended early"
        got += len(chunk)
    await _close(writer, reset)


async def _abandon(gw: SecureGateway, reset: bool, ordinal: int) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(_head(gw, "GET", "/fake/slow"))
    await writer.drain()
    # Leave once this request (or a later one) is waiting at the upstream.
    assert await settle(lambda: gw.upstream.hits("slow") >= ordinal, within=20)
    await _close(writer, reset)


async def _complete(gw: SecureGateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url / "fake" / "stream", params={"bytes": str(MIB)},
                         headers=gw.auth_header) as r:
            assert r.status == 200 and len(await r.read()) == MIB
        async with s.post(gw.url / "fake" / "upload", data=b"x" * MIB,
                          headers=gw.auth_header) as r:
            assert r.status == 200


@pytest.mark.timeout(120)
async def test_a_thousand_aborted_requests_leak_nothing(secure_gateway: Any,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    gw: SecureGateway = await secure_gateway(config={"server": {"max_body_bytes": 64 * MIB}})
    await gw.connect_alice(("fake",))
    for browser in gw.sessions:  # (the consent flow's browsers keep connections alive)
        await browser.close()
    session = gw.services.http
    await _complete(gw)  # warm: pools, caches, lazily created tasks
    assert await settle(lambda: server_connections(gw.server) == 0)
    tasks, fds = len(asyncio.all_tasks()), open_fds()

    gate = asyncio.Semaphore(CONCURRENCY)
    slow, uploads = itertools.count(1), itertools.count(2)  # (the warm-up uploaded once)
    shapes = itertools.cycle(["upload", "download", "upload", "download", "abandon"])

    async def one(i: int, shape: str) -> None:
        async with gate:
            reset = i % 2 == 0
            if shape == "upload":
                await asyncio.wait_for(_upload(gw, reset, next(uploads)), 20)
            elif shape == "download":
                await asyncio.wait_for(_download(gw, reset), 20)
            else:
                await asyncio.wait_for(_abandon(gw, reset, next(slow)), 20)

    caplog.set_level(logging.WARNING)
    await asyncio.gather(*(one(i, shape) for i, shape in zip(range(ABORTS), shapes,
                                                            strict=False)))

    def back_to_baseline() -> bool:
        in_use, idle = connector_counts(session)
        return (server_connections(gw.server) == 0 and in_use == 0
                and len(asyncio.all_tasks()) <= tasks and open_fds() <= fds + 2 * idle)

    settled = await settle(back_to_baseline, within=20)
    in_use, idle = connector_counts(session)
    assert settled, (f"after {ABORTS} aborted requests: {server_connections(gw.server)} client "
                     f"connections open, {in_use} upstream connections in use, {idle} idle, "
                     f"tasks {len(asyncio.all_tasks())} (baseline {tasks}), fds {open_fds()} "
                     f"(baseline {fds})")
    assert idle <= CONCURRENCY  # the pool keeps at most what was in use at once
    assert gw.upstream.hits("slow") == ABORTS // 5
    assert gw.upstream.hits("upload") == 2 * ABORTS // 5 + 1
    assert gw.upstream.body_failed.is_set()  # uploads did break off mid-body upstream
    await _complete(gw)  # and the gateway still serves
    crashes = [r for r in caplog.records if r.name == "gateway.error" or "destroyed" in
               r.getMessage() or "never retrieved" in r.getMessage()]
    assert crashes == [], [r.getMessage() for r in crashes[:5]]
