"""/_gateway/metrics: every family moves when its event happens; labels stay bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from gateway.app import OpsSettings
from tests.integration.conftest import Gateway
from tests.ops.conftest import ADMIN_KEY, PASSWORD, sample, scrape


async def test_request_consent_cache_and_latency_metrics(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("alice", PASSWORD)
    before = await scrape(gw)
    assert sample(before, "gateway_consent_total", stage="started") == 0
    assert (await gw.connect("alice", PASSWORD)).status == 200
    auth = {"Authorization": f"Bearer {key}"}
    async with gw.client() as c:
        for _ in range(3):
            r = await c.get(gw.url / "fake/stream", params={"bytes": "10"}, headers=auth)
            assert r.status == 200 and len(await r.read()) == 10
        r = await c.delete(gw.url / "fake/echo", params={"status": "503"}, headers=auth)
        assert r.status == 503
        r = await c.get(gw.url / "no-such-provider-xyz/a", headers=auth)
        assert r.status == 404
    text = await scrape(gw)
    assert sample(text, "gateway_consent_total", provider="fake", stage="started") == 1
    assert sample(text, "gateway_consent_total", provider="fake", stage="completed") == 1
    assert sample(text, "gateway_requests_total", provider="fake", method="GET",
                  status_class="2xx") == 3
    assert sample(text, "gateway_requests_total", provider="fake", method="DELETE",
                  status_class="5xx") == 1
    assert sample(text, "gateway_requests_total", provider="_unknown",
                  status_class="4xx") == 1
    assert "no-such-provider-xyz" not in text  # a client cannot mint label values
    assert sample(text, "gateway_requests_total", provider="_gateway") >= 3  # the flow's pages
    assert sample(text, "gateway_upstream_latency_seconds_count", provider="fake") == 4
    assert sample(text, "gateway_request_duration_seconds_count", provider="fake") == 4
    # First lease read the store (miss), the rest came from the cache.
    assert sample(text, "gateway_token_cache_total", provider="fake", result="miss") == 1
    assert sample(text, "gateway_token_cache_total", provider="fake", result="hit") == 3
    assert "identity=" not in text  # no identity labels unless asked for
    assert sample(text, "gateway_requests_in_flight") == 1  # the scrape itself


async def test_refresh_outcomes_and_failed_consent(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("alice", PASSWORD)
    assert (await gw.connect("alice", PASSWORD)).status == 200
    auth = {"Authorization": f"Bearer {key}"}
    async with gw.client() as c:
        gw.clock.advance(7200)  # the access token is past its expiry: refresh
        assert (await c.get(gw.url / "fake/stream", headers=auth)).status == 200
        gw.clock.advance(7200)
        gw.auth.fail_next(1, status=503)  # transient: refresh fails
        r = await c.get(gw.url / "fake/stream", headers=auth)
        assert r.status == 503 and r.headers["Gateway-Error"] == "token_endpoint_unavailable"
        gw.auth.fail_next(1, status=400, body='{"error": "invalid_grant"}')
        r = await c.get(gw.url / "fake/stream", headers=auth)
        assert r.headers["Gateway-Error"] == "reconsent_required"
    gw.auth.deny = True
    denied = await gw.connect("alice", PASSWORD)
    assert denied.status == 400
    text = await scrape(gw)
    assert sample(text, "gateway_token_refreshes_total", provider="fake", outcome="ok") == 1
    assert sample(text, "gateway_token_refreshes_total", provider="fake", outcome="failed") == 1
    assert sample(text, "gateway_token_refreshes_total", provider="fake",
                  outcome="reconsent_required") == 1
    assert sample(text, "gateway_consent_total", provider="fake", stage="failed") == 1


async def test_identity_labels_only_when_configured(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway(ops=OpsSettings(admin_key=ADMIN_KEY, identity_labels=True))
    key = await gw.identity("alice", PASSWORD)
    assert (await gw.connect("alice", PASSWORD)).status == 200
    async with gw.client() as c:
        r = await c.get(gw.url / "fake/stream", headers={"Authorization": f"Bearer {key}"})
        assert r.status == 200
    text = await scrape(gw)
    assert sample(text, "gateway_requests_total", provider="fake", identity="alice") == 1
    assert key not in text


async def test_in_flight_counts_a_request_held_upstream(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("alice", PASSWORD)
    assert (await gw.connect("alice", PASSWORD)).status == 200
    async with aiohttp.ClientSession() as c:
        slow = asyncio.create_task(c.get(gw.url / "fake/slow",
                                         headers={"Authorization": f"Bearer {key}"}))
        await gw.upstream.slow_started.wait()
        assert sample(await scrape(gw), "gateway_requests_in_flight") == 2
        gw.upstream.release.set()
        r = await slow
        assert r.status == 200 and await r.text() == "finally"
    assert sample(await scrape(gw), "gateway_requests_in_flight") == 1
