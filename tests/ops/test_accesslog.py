"""One structured access-log line per request, with a request id that travels upstream."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.integration.conftest import Gateway
from tests.ops.conftest import PASSWORD, access_lines


async def _connected(ops_gateway: Any) -> tuple[Gateway, str]:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("alice", PASSWORD)
    assert (await gw.connect("alice", PASSWORD)).status == 200
    return gw, key


async def test_proxied_request_line_has_every_field(ops_gateway: Any,
                                                    logs: pytest.LogCaptureFixture) -> None:
    gw, key = await _connected(ops_gateway)
    logs.clear()
    async with gw.client() as c:
        r = await c.post(gw.url / "fake/upload", params={"bytes": "7", "q": "hidden-query"},
                         data=b"0123456789", headers={"Authorization": f"Bearer {key}",
                                                       "X-Request-Id": "trace-42:abc"})
        body = await r.read()
    assert r.status == 200
    assert "X-Request-Id" not in r.headers  # an upstream answer passes through unchanged
    [line] = access_lines(logs)
    assert line["msg"] == "request" and line["level"] == "info"
    assert line["request_id"] == "trace-42:abc"
    assert line["method"] == "POST" and line["path"] == "/fake/upload"  # never the query
    assert line["status"] == 200 and line["upstream_status"] == 200
    assert line["provider"] == "fake" and line["identity"] == "alice"
    assert line["bytes_in"] == 10  # request body bytes
    assert len(body) < line["bytes_out"] < len(body) + 2048  # response bytes on the wire
    assert line["duration_ms"] >= 0 and line["error"] is None
    assert line["remote"] == "127.0.0.1"
    # The id went upstream with the request.
    assert gw.upstream.requests[-1].header("X-Request-Id") == "trace-42:abc"


@pytest.mark.parametrize("given", [None, "has spaces in it", "x" * 129, "quote\"d"])
async def test_missing_or_malformed_request_id_is_replaced(
        ops_gateway: Any, logs: pytest.LogCaptureFixture, given: str | None) -> None:
    gw, key = await _connected(ops_gateway)
    logs.clear()
    headers = {"Authorization": f"Bearer {key}"}
    if given is not None:
        headers["X-Request-Id"] = given
    async with gw.client() as c:
        r = await c.get(gw.url / "fake/stream", params={"bytes": "5"}, headers=headers)
        assert r.status == 200 and await r.read()
    [line] = access_lines(logs)
    rid = line["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert gw.upstream.requests[-1].header_all("X-Request-Id") == [rid]


async def test_gateway_errors_are_logged_and_echo_the_request_id(
        ops_gateway: Any, logs: pytest.LogCaptureFixture) -> None:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("bob", PASSWORD)
    logs.clear()
    async with gw.client() as c:
        r1 = await c.get(gw.url / "nosuchprovider/x", headers={"Authorization": f"Bearer {key}",
                                                                "X-Request-Id": "r-1"})
        r2 = await c.get(gw.url / "fake/x", headers={"Authorization": "Bearer nope"})
        r3 = await c.get(gw.url / "fake/x", headers={"Authorization": f"Bearer {key}"})
    assert r1.status == 404 and r1.headers["X-Request-Id"] == "r-1"
    assert r2.status == 401 and r2.headers["X-Request-Id"]
    assert r3.status == 401 and r3.headers["Gateway-Error"] == "consent_required"
    lines = access_lines(logs)
    assert [(ln["status"], ln["error"], ln["provider"], ln["identity"]) for ln in lines] == [
        (404, "unknown_provider", None, "bob"),
        (401, "unauthenticated", "fake", None),
        (401, "consent_required", "fake", "bob"),
    ]
    assert all(ln["upstream_status"] is None for ln in lines)
    assert gw.upstream.requests == []


async def test_pages_and_probes(ops_gateway: Any, logs: pytest.LogCaptureFixture) -> None:
    gw: Gateway = await ops_gateway()
    await gw.identity("carol", PASSWORD)
    logs.clear()
    browser = gw.client()
    assert (await gw.login(browser, "carol", PASSWORD)).status == 303
    page = await browser.get(gw.url / "_gateway/")
    assert page.status == 200 and page.headers["X-Request-Id"]
    async with gw.client() as c:
        assert (await c.get(gw.url / "_gateway/healthz")).status == 200
    lines = access_lines(logs)
    dashboard = [ln for ln in lines if ln["path"] == "/_gateway/"]
    assert dashboard and dashboard[-1]["identity"] == "carol"  # from the browser session
    assert dashboard[-1]["bytes_out"] > 0
    probe = [r for r in logs.records if r.name == "gateway.access"
             and getattr(r, "fields", {}).get("path") == "/_gateway/healthz"]
    assert probe and probe[0].levelname == "DEBUG"  # health probes stay out of INFO logs
