"""The authorization server failing while the gateway needs it (SPEC invariants 5 and 6;
RFC 6749 §5.2, RFC 9700 §2.2.2 and §4.13 on refresh tokens).

Every failure of the token endpoint (5xx, 429, timeout, garbage, an HTML page from a proxy in
front of it, a 200 without a token) must end in ``503 token_endpoint_unavailable`` with
Retry-After when no valid access token is left, in the current token being used when one is,
and never in lost tokens: the stored connection is unchanged, and the next request after the
fault refreshes with the very same refresh token. Nothing the provider said is echoed to the
client beyond a short error code, and no token is.

Through the whole app (real SQLite, real consent); the OAuth client alone is covered in
tests/oauth/test_client.py (garbage, timeout, unreachable, redirect, oversized bodies) and the
token manager's decisions in tests/tokens/.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.security.conftest import SecureGateway, db_rows

TOKEN_TIMEOUT = 0.5

FAULTS: dict[str, dict[str, Any]] = {
    "500 json": {"status": 500},
    "503 with Retry-After": {"status": 503, "headers": {"Retry-After": "7"}},
    "502 html from a proxy": {"status": 502, "content_type": "text/html",
                              "body": "<html><body><h1>502 Bad Gateway</h1></body></html>"},
    "429": {"status": 429, "headers": {"Retry-After": "3"}, "body": ""},
    "200 garbage": {"status": 200, "content_type": "application/json", "body": b"\x00{not json"},
    "200 html login page": {"status": 200, "content_type": "text/html",
                            "body": "<html><form action=/login>Sign in</form></html>"},
    "200 empty": {"status": 200, "content_type": None, "body": b""},
    "200 json without a token": {"status": 200, "body": '{"token_type": "Bearer"}'},
    "200 truncated json": {"status": 200, "body": '{"access_token": "abc", "expires'},
    "200 json array": {"status": 200, "body": "[1, 2, 3]"},
    "200 huge body": {"status": 200, "body": b"{" + b" " * (2 * 1024 * 1024)},
}


async def _connected(secure_gateway: Any, **knobs: Any) -> SecureGateway:
    gw: SecureGateway = await secure_gateway(
        config={"server": {"token_timeout": TOKEN_TIMEOUT}}, **knobs)
    await gw.connect_alice(("fake",))
    return gw


async def _call(gw: SecureGateway) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as s, \
            s.get(gw.url / "fake" / "data", headers=gw.auth_header) as r:
        return r.status, dict(r.headers), await r.text()


def _tokens(gw: SecureGateway) -> list[str]:
    return [*gw.auth.access_tokens, *gw.auth.refresh_tokens]


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
async def test_failure_with_an_expired_token_is_503_and_keeps_the_tokens(
        secure_gateway: Any, fault: str) -> None:
    gw = await _connected(secure_gateway)
    stored = db_rows(gw.db_path)["connections"]
    [refresh_token] = gw.auth.refresh_tokens
    gw.clock.advance(7200)
    gw.auth.fail_next(1, **FAULTS[fault])

    status, headers, body = await _call(gw)

    assert status == 503, body
    assert headers["Gateway-Error"] == "token_endpoint_unavailable"
    assert int(headers["Retry-After"]) >= 1
    for secret in _tokens(gw):
        assert secret not in body
    assert "<html" not in body and "Sign in" not in body  # the provider's page is not echoed
    assert db_rows(gw.db_path)["connections"] == stored  # nothing lost, nothing half-written
    assert gw.auth.is_valid_refresh_token(refresh_token) == "alice"
    # The fault is gone: the same refresh token works, once.
    hits = gw.auth.hits["token"]
    status, _, body = await _call(gw)
    assert status == 200, body
    assert gw.auth.hits["token"] == hits + 1


@pytest.mark.parametrize("fault", ["500 json", "200 garbage", "200 html login page"])
async def test_failure_before_expiry_keeps_serving_the_current_token(secure_gateway: Any,
                                                                     fault: str) -> None:
    gw = await _connected(secure_gateway)
    gw.clock.advance(3600 - 30)  # within the refresh skew, not yet expired
    gw.auth.fail_next(1, **FAULTS[fault])
    status, _, body = await _call(gw)
    assert status == 200, body
    hits = gw.auth.hits["token"]
    for _ in range(5):  # backing off: no stampede on a failing endpoint
        assert (await _call(gw))[0] == 200
    assert gw.auth.hits["token"] == hits


async def test_timeout_is_503_within_the_bound_and_spends_no_refresh_token(
        secure_gateway: Any) -> None:
    gw = await _connected(secure_gateway)
    [refresh_token] = gw.auth.refresh_tokens
    gw.clock.advance(7200)
    gw.auth.hold_tokens()  # the token endpoint accepts the request and never answers
    try:
        started = time.monotonic()
        status, headers, _ = await _call(gw)
        elapsed = time.monotonic() - started
    finally:
        gw.auth.release_tokens()
    assert status == 503 and headers["Gateway-Error"] == "token_endpoint_unavailable"
    assert TOKEN_TIMEOUT * 0.9 <= elapsed < TOKEN_TIMEOUT + 2.0, elapsed
    assert gw.auth.is_valid_refresh_token(refresh_token) == "alice"
    assert (await _call(gw))[0] == 200


async def test_slow_endpoint_one_refresh_for_all_waiters(secure_gateway: Any) -> None:
    gw = await _connected(secure_gateway)
    gw.clock.advance(7200)
    hits = gw.auth.hits["token"]
    gw.auth.hold_tokens()
    calls = [asyncio.create_task(_call(gw)) for _ in range(25)]
    await gw.auth.wait_for_hits("token", hits + 1)  # the one refresh is at the provider
    gw.auth.release_tokens()
    answers = await asyncio.gather(*calls)
    assert [a[0] for a in answers] == [200] * 25
    assert gw.auth.hits["token"] == hits + 1


async def test_a_flapping_endpoint_never_loses_the_connection(secure_gateway: Any) -> None:
    """Twenty expiries in a row, every other refresh failing in a different way."""
    gw = await _connected(secure_gateway)
    kinds = list(FAULTS)
    for i in range(20):
        gw.clock.advance(7200)
        if i % 2:
            gw.auth.fail_next(1, **FAULTS[kinds[i % len(kinds)]])
            assert (await _call(gw))[0] == 503
        status, _, body = await _call(gw)
        assert status == 200, (i, body)
    conn = await gw.services.store.get_connection(1, "fake")
    assert conn is not None and conn.status == "active"
