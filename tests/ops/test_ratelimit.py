"""Per-identity token buckets: the pure arithmetic, and 429 with Retry-After at the edge."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.app import OpsSettings
from gateway.errors import TooManyRequests
from gateway.ratelimit import Bucket, RateLimit, RateLimiter, take
from tests.ops.conftest import ADMIN_KEY, PASSWORD, sample, scrape


def test_burst_then_refill_at_the_rate() -> None:
    limit = RateLimit(requests_per_second=2, burst=3)
    b, waits = None, []
    for _ in range(4):
        b, wait = take(b, limit, now=100.0)
        waits.append(wait)
    assert waits == [0, 0, 0, 0.5]  # three at once, the fourth waits half a second
    b, wait = take(b, limit, now=100.5)
    assert wait == 0
    b, wait = take(b, limit, now=100.5)
    assert wait == pytest.approx(0.5)


def test_refused_requests_take_nothing_and_refill_is_capped() -> None:
    limit = RateLimit(requests_per_second=1, burst=2)
    b = Bucket(tokens=0.0, updated=0.0)
    for _ in range(5):  # hammering an empty bucket does not push recovery further away
        b, wait = take(b, limit, now=0.0)
        assert wait == pytest.approx(1.0)
    b, wait = take(b, limit, now=1000.0)  # a long idle period refills only up to the burst
    assert wait == 0 and b.tokens == pytest.approx(1.0)


def test_clock_going_backwards_refills_nothing() -> None:
    limit = RateLimit(requests_per_second=1, burst=1)
    b, _ = take(None, limit, now=50.0)
    b, wait = take(b, limit, now=10.0)
    assert wait == pytest.approx(1.0)


@pytest.mark.parametrize("rps, burst", [(0, 1), (-1, 1), (float("nan"), 1), (1, 0)])
def test_bad_limits_are_refused(rps: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimit(rps, burst)


def test_limiter_is_per_key_and_prunes_idle_buckets() -> None:
    now = [0.0]
    limiter = RateLimiter(RateLimit(1, 1), clock=lambda: now[0], max_keys=2)
    limiter.check(1)
    with pytest.raises(TooManyRequests) as err:
        limiter.check(1)
    assert err.value.retry_after == 1 and err.value.headers()["Retry-After"] == "1"
    limiter.check(2)  # another identity has its own bucket
    now[0] = 10.0
    limiter.check(3)  # a third key: idle full buckets are dropped first
    assert len(limiter._buckets) <= 2


async def test_gateway_answers_429_with_retry_after_per_identity(ops_gateway: Any) -> None:
    gw = await ops_gateway(ops=OpsSettings(admin_key=ADMIN_KEY,
                                           rate_limit=RateLimit(0.01, 2)))
    alice = await gw.identity("alice", PASSWORD)
    bob = await gw.identity("bob", PASSWORD)
    assert (await gw.connect("alice", PASSWORD)).status == 200
    async with gw.client() as c:
        statuses = []
        for _ in range(3):
            r = await c.get(gw.url / "fake/stream", params={"bytes": "3"},
                            headers={"Authorization": f"Bearer {alice}"})
            statuses.append(r.status)
            body = await r.read()
        assert statuses == [200, 200, 429]
        assert r.headers["Gateway-Error"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 100
        assert b"rate_limited" in body
        # The upstream saw only the two allowed requests.
        assert gw.upstream.hits("stream") == 2
        # Bob's bucket is untouched (he has no connection: the limit is not what stops him).
        r = await c.get(gw.url / "fake/x", headers={"Authorization": f"Bearer {bob}"})
        assert r.status == 401 and r.headers["Gateway-Error"] == "consent_required"
    assert sample(await scrape(gw), "gateway_rate_limited_total") == 1


async def test_no_limit_configured_means_no_429(ops_gateway: Any) -> None:
    gw = await ops_gateway()
    alice = await gw.identity("alice", PASSWORD)
    async with gw.client() as c:
        for _ in range(20):
            r = await c.get(gw.url / "fake/x", headers={"Authorization": f"Bearer {alice}"})
            assert r.status == 401  # consent_required every time, never 429
