"""/_gateway/healthz (alive) and /_gateway/readyz (store, config, discovery, draining)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import REGISTRY
from tests.integration.conftest import Gateway


async def _get(gw: Gateway, path: str) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as c, c.get(gw.url / path) as r:
        return r.status, dict(r.headers), await r.json()


async def test_healthz_and_readyz_when_all_is_well(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    status, _, body = await _get(gw, "_gateway/healthz")
    assert status == 200 and body == {"status": "ok", "pid": os.getpid()}
    status, _, body = await _get(gw, "_gateway/readyz")
    assert status == 200 and body["status"] == "ready"
    assert body["checks"] == {"config": "loaded", "store": "ok", "providers": "ok"}
    assert body["unusable_providers"] == {}


async def test_not_ready_when_the_store_is_unreachable(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    await gw.services.store.close()
    status, headers, body = await _get(gw, "_gateway/readyz")
    assert status == 503 and headers["Gateway-Error"] == "not_ready"
    assert body["checks"]["store"] == "unreachable"
    status, _, _ = await _get(gw, "_gateway/healthz")
    assert status == 200  # alive all the same: restarting would not help


async def test_not_ready_while_draining(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    gw.services.draining = True
    status, _, body = await _get(gw, "_gateway/readyz")
    assert status == 503 and body["checks"]["server"] == "draining"


async def test_not_ready_until_discovery_has_finished(ops_gateway: Any,
                                                      aiohttp_server: Any) -> None:
    """A provider configured by ``issuer`` only: ready once its metadata arrived."""
    gate = asyncio.Event()
    arrived = asyncio.Event()
    holder: dict[str, Any] = {}

    async def metadata(request: web.Request) -> web.Response:
        arrived.set()
        await gate.wait()
        base = holder["url"]
        return web.json_response({
            "issuer": base, "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token", "response_types_supported": ["code"]})

    idp_app = web.Application()
    idp_app.router.add_get("/.well-known/openid-configuration", metadata)
    idp = await aiohttp_server(idp_app)
    holder["url"] = str(idp.make_url("")).rstrip("/")
    gw: Gateway = await ops_gateway(config={"providers": {"oidc": {
        "issuer": holder["url"], "client_id": "c", "client_secret": "s" * 12,
        "upstream": "http://127.0.0.1:9/"}}})
    await arrived.wait()
    status, _, body = await _get(gw, "_gateway/readyz")
    assert status == 503 and body["checks"]["providers"] == "discovering"
    assert "discovery" in body["unusable_providers"]["oidc"]
    assert not gw.app[REGISTRY]["oidc"].usable  # no request uses half-known endpoints
    gate.set()
    for _ in range(1000):  # poll readiness, as a load balancer would
        status, _, body = await _get(gw, "_gateway/readyz")
        if status == 200:
            break
    assert status == 200 and body["checks"]["providers"] == "ok"
    oidc = gw.app[REGISTRY]["oidc"]
    assert oidc.usable and str(oidc.token_url) == f"{holder['url']}/token"
