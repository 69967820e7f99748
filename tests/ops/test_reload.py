"""Reloading the provider config in a running app: new providers appear, requests in flight
finish with the config they started with, and an invalid file changes nothing."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app import REGISTRY, reload_config
from tests.fakes.upstream import start_upstream
from tests.integration.conftest import Gateway
from tests.ops.conftest import PASSWORD, sample, scrape


def _edit(gw: Gateway, change: Any) -> None:
    data = yaml.safe_load(gw.config.source.read_text())
    change(data)
    gw.config.source.write_text(yaml.safe_dump(data))


async def test_reload_swaps_providers_without_touching_requests_in_flight(
        ops_gateway: Any, aiohttp_server: Any, logs: pytest.LogCaptureFixture) -> None:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("alice", PASSWORD)
    assert (await gw.connect("alice", PASSWORD)).status == 200
    auth = {"Authorization": f"Bearer {key}"}
    other = await start_upstream(aiohttp_server)
    async with aiohttp.ClientSession() as c:
        slow = asyncio.create_task(c.get(gw.url / "fake/slow", headers=auth))
        await gw.upstream.slow_started.wait()

        def change(data: dict[str, Any]) -> None:
            data["providers"]["fake"]["upstream"] = str(other.url / "v2")
            data["providers"]["second"] = {**data["providers"]["fake"]}

        _edit(gw, change)
        assert await reload_config(gw.app) is True
        assert set(gw.app[REGISTRY]) == {"fake", "second"}
        gw.upstream.release.set()
        r = await slow
        assert r.status == 200 and await r.text() == "finally"  # the old upstream answered
        r = await c.get(gw.url / "fake/stream", params={"bytes": "4"}, headers=auth)
        assert r.status == 200
        assert other.requests[-1].raw_path == "/v2/stream?bytes=4"  # new requests: new config
        r = await c.get(gw.url / "second/x", headers=auth)
        assert r.headers["Gateway-Error"] == "consent_required"  # known now, not connected
    [line] = [r.getMessage() for r in logs.records if "config reloaded" in r.getMessage()]
    assert "added: second" in line and "changed: fake" in line
    assert sample(await scrape(gw), "gateway_config_reloads_total", outcome="ok") == 1


@pytest.mark.parametrize("broken, where", [
    ("providers: [oops\n", "not valid YAML"),
    (None, "providers.fake.client_auth"),
])
async def test_an_invalid_config_is_refused_and_the_old_one_kept(
        ops_gateway: Any, logs: pytest.LogCaptureFixture, broken: str | None,
        where: str) -> None:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("alice", PASSWORD)
    assert (await gw.connect("alice", PASSWORD)).status == 200
    before = gw.app[REGISTRY].current
    if broken is None:
        _edit(gw, lambda d: d["providers"]["fake"].update(client_auth="telepathy"))
    else:
        gw.config.source.write_text(broken)
    assert await reload_config(gw.app) is False
    assert gw.app[REGISTRY].current is before
    refused = [r for r in logs.records if "config reload refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert where in refused[0].getMessage() and str(gw.config.source) in refused[0].getMessage()
    async with aiohttp.ClientSession() as c:
        r = await c.get(gw.url / "fake/stream", headers={"Authorization": f"Bearer {key}"})
        assert r.status == 200
    assert sample(await scrape(gw), "gateway_config_reloads_total", outcome="refused") == 1


async def test_changes_outside_providers_wait_for_a_restart(
        ops_gateway: Any, logs: pytest.LogCaptureFixture) -> None:
    gw: Gateway = await ops_gateway()
    _edit(gw, lambda d: d["server"].update(read_timeout=5))
    assert await reload_config(gw.app) is True
    assert any("server take effect at the next restart" in r.getMessage()
               for r in logs.records)
    assert gw.services.config.server.read_timeout == gw.config.server.read_timeout
