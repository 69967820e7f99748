"""Failed logins slow down further tries, per identity name and per client address."""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.web.console import FAILURE_WINDOW, MAX_FAILURES, LoginThrottle
from tests.integration.conftest import Gateway
from tests.web.conftest import PW


def from_address(gw: Gateway, address: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``address`` (any 127.x works on loopback)."""
    return gw.client(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def _try(gw: Gateway, client: aiohttp.ClientSession, name: str,
               password: str) -> aiohttp.ClientResponse:
    return await gw.login(client, name, password)


async def test_sixth_failure_for_a_name_gets_429_with_retry_after(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("alice", PW)
    c = gw.client()
    for _ in range(MAX_FAILURES):
        assert (await _try(gw, c, "alice", "wrong")).status == 401
    blocked = await _try(gw, c, "alice", PW)  # even the right password waits
    assert blocked.status == 429
    assert int(blocked.headers["Retry-After"]) >= 1
    assert "Too many failed logins" in await blocked.text()
    assert not any(k.key == "gateway_session" for k in c.cookie_jar)

    gw.clock.advance(int(blocked.headers["Retry-After"]))
    assert (await _try(gw, c, "alice", "wrong")).status == 401  # one more try allowed ...
    again = await _try(gw, c, "alice", PW)  # ... then the wait doubles
    assert again.status == 429 and int(again.headers["Retry-After"]) >= 2
    gw.clock.advance(int(again.headers["Retry-After"]))
    assert (await _try(gw, c, "alice", PW)).status == 303


async def test_per_address_across_names(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("alice", PW)
    sprayer = from_address(gw, "127.0.0.3")
    for i in range(MAX_FAILURES):
        assert (await _try(gw, sprayer, f"user{i}", "guess")).status == 401
    assert (await _try(gw, sprayer, "alice", PW)).status == 429
    # Someone at another address is not affected.
    assert (await _try(gw, from_address(gw, "127.0.0.4"), "alice", PW)).status == 303


async def test_per_name_across_addresses(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("alice", PW)
    for i in range(MAX_FAILURES):
        c = from_address(gw, f"127.0.1.{i + 1}")
        assert (await _try(gw, c, "alice", "guess")).status == 401
    fresh = from_address(gw, "127.0.1.99")
    assert (await _try(gw, fresh, "ALICE", "guess")).status == 429  # names are case-blind
    assert (await _try(gw, fresh, "bob", "guess")).status == 401  # other names still tried
    gw.clock.advance(FAILURE_WINDOW)
    assert (await _try(gw, fresh, "alice", PW)).status == 303  # the window passed


def test_throttle_backoff_and_reset() -> None:
    now = [1000.0]
    t = LoginThrottle(lambda: now[0])
    for _ in range(MAX_FAILURES - 1):
        t.failed("name:a", "addr:x")
    assert t.blocked_for("name:a", "addr:x") == 0
    t.failed("name:a", "addr:x")
    assert t.blocked_for("name:a") == 1.0
    t.failed("name:a")
    assert t.blocked_for("name:a") == 2.0
    t.succeeded("name:a")
    assert t.blocked_for("name:a") == 0
    assert t.blocked_for("addr:x") == 1.0  # the address keeps its count
    now[0] += FAILURE_WINDOW
    assert t.blocked_for("addr:x") == 0 and "addr:x" not in t.failures


def test_throttle_memory_is_bounded_without_forgetting_the_sprayer(monkeypatch: Any) -> None:
    from gateway.web import console

    monkeypatch.setattr(console, "MAX_THROTTLE_KEYS", 100)
    now = [0.0]
    t = LoginThrottle(lambda: now[0])
    for i in range(1000):
        now[0] += 0.01
        t.failed(f"name:n{i}", "addr:sprayer")
    assert len(t.failures) <= 100
    assert t.blocked_for("addr:sprayer") > 0
