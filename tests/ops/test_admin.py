"""The admin API under /_gateway/api/admin/, and the CLI sharing its operations."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.app import OpsSettings
from tests.integration.conftest import Gateway
from tests.ops.conftest import ADMIN_KEY, PASSWORD

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
API = "_gateway/api/admin"


async def call(gw: Gateway, method: str, path: str, *, headers: dict[str, str] | None = None,
               **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    path, _, query = path.partition("?")
    url = (gw.url / API / path if path else gw.url / API).with_query(query)
    async with aiohttp.ClientSession() as c:
        r = await c.request(method, url, headers=ADMIN if headers is None else headers, **kw)
        body = await r.json(content_type=None)
        return r.status, body, r


@pytest.mark.parametrize("method, path", [
    ("GET", "identities"), ("POST", "identities"), ("DELETE", "identities/alice"),
    ("GET", "connections"), ("GET", "audit"), ("GET", "nope"), ("GET", ""),
])
async def test_no_admin_key_means_no_admin_api(ops_gateway: Any, method: str, path: str) -> None:
    gw: Gateway = await ops_gateway(ops=OpsSettings(admin_key=None))
    status, body, r = await call(gw, method, path, json={"name": "x"})
    assert status == 404 and body["error"] == "not_found"
    assert r.headers["Gateway-Error"] == "not_found"
    assert await gw.services.store.get_identity("x") is None


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-key-wrong-key-wrong-key"},
    {"Authorization": f"Basic {ADMIN_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}x"},
    {"Authorization": f"Bearer {ADMIN_KEY[:-1]}"},
])
async def test_wrong_or_missing_admin_key_is_401(ops_gateway: Any,
                                                 headers: dict[str, str]) -> None:
    gw: Gateway = await ops_gateway()
    status, body, r = await call(gw, "POST", "identities", headers=headers, json={"name": "x"})
    assert status == 401 and body["error"] == "unauthenticated"
    assert "WWW-Authenticate" in r.headers
    assert await gw.services.store.get_identity("x") is None


async def test_a_gateway_key_is_not_an_admin_key(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("alice", PASSWORD)
    status, _, _ = await call(gw, "GET", "identities", headers={"Authorization": f"Bearer {key}"})
    assert status == 401


async def test_identities_and_keys(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    status, body, r = await call(gw, "POST", "identities",
                                 json={"name": "alice", "password": PASSWORD})
    assert status == 201 and r.headers["Cache-Control"] == "no-store"
    first = body["key"]
    assert body["identity"]["name"] == "alice" and body["identity"]["has_password"]
    assert body["prefix"] == first[:12]
    async with aiohttp.ClientSession() as c:  # the new key works at once
        ok = await c.post(gw.url / "_gateway/api/connect/fake",
                          headers={"Authorization": f"Bearer {first}"})
        assert ok.status == 200

    status, body, _ = await call(gw, "POST", "identities/alice/keys")
    assert status == 201
    second = body["key"]
    status, body, _ = await call(gw, "GET", "identities/alice/keys")
    assert status == 200
    assert sorted(k["prefix"] for k in body["keys"]) == sorted([first[:12], second[:12]])
    assert first not in str(body) and second not in str(body)  # listed by prefix only

    status, body, _ = await call(gw, "DELETE", f"identities/alice/keys/{first[:12]}")
    assert status == 200 and body["revoked"] == first[:12]
    async with aiohttp.ClientSession() as c:
        refused = await c.post(gw.url / "_gateway/api/connect/fake",
                               headers={"Authorization": f"Bearer {first}"})
        assert refused.status == 401

    status, body, _ = await call(gw, "GET", "identities")
    assert body["identities"] == [{"name": "alice", "created_at": pytest.approx(gw.clock(), abs=5),
                                   "has_password": True, "active_keys": 1}]
    status, body, _ = await call(gw, "DELETE", "identities/alice")
    assert status == 200 and body == {"removed": "alice", "connections_forgotten": []}
    status, body, _ = await call(gw, "GET", "identities")
    assert body["identities"] == []


@pytest.mark.parametrize("method, path, kw, code, error", [
    ("POST", "identities", {"data": b"{not json"}, 400, "bad_request"),
    ("POST", "identities", {"json": ["alice"]}, 400, "bad_request"),
    ("POST", "identities", {"json": {}}, 400, "bad_request"),
    ("POST", "identities", {"json": {"name": 7}}, 400, "bad_request"),
    ("POST", "identities", {"json": {"name": "bad name!"}}, 400, "bad_request"),
    ("POST", "identities", {"json": {"name": "new", "password": "short"}}, 400, "bad_request"),
    ("POST", "identities", {"json": {"name": "alice"}}, 400, "bad_request"),  # exists
    ("DELETE", "identities/ghost", {}, 404, "not_found"),
    ("POST", "identities/ghost/keys", {}, 404, "not_found"),
    ("DELETE", "identities/alice/keys/gwk_nothere", {}, 400, "bad_request"),
    ("GET", "connections?identity=ghost", {}, 404, "not_found"),
    ("DELETE", "connections/alice/fake", {}, 404, "not_found"),
    ("DELETE", "connections/ghost/fake", {}, 404, "not_found"),
    ("GET", "audit?since=yesterday-ish", {}, 400, "bad_request"),
    ("GET", "audit?limit=0", {}, 400, "bad_request"),
    ("GET", "audit?limit=many", {}, 400, "bad_request"),
    ("PUT", "identities", {}, 404, "not_found"),
    ("GET", "whatever/else", {}, 404, "not_found"),
])
async def test_bad_input_is_refused_and_changes_nothing(ops_gateway: Any, method: str,
                                                        path: str, kw: dict[str, Any],
                                                        code: int, error: str) -> None:
    gw: Gateway = await ops_gateway()
    await gw.identity("alice", PASSWORD)
    before = [i.name for i in await gw.services.store.list_identities()]
    keys_before = await gw.services.store.list_api_keys(1)
    status, body, _ = await call(gw, method, path, **kw)
    assert (status, body["error"]) == (code, error), body
    assert [i.name for i in await gw.services.store.list_identities()] == before
    assert await gw.services.store.list_api_keys(1) == keys_before


async def test_connections_list_and_revoke_then_audit(ops_gateway: Any, cli: Any) -> None:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("alice", PASSWORD)
    await gw.identity("bob", PASSWORD)
    assert (await gw.connect("alice", PASSWORD)).status == 200
    status, body, _ = await call(gw, "GET", "connections")
    [conn] = body["connections"]
    assert conn["identity"] == "alice" and conn["provider"] == "fake"
    assert conn["status"] == "active" and conn["expires_at"] > gw.clock()
    for token in [*gw.auth.access_tokens, *gw.auth.refresh_tokens]:
        assert token not in str(body)
    status, body, _ = await call(gw, "GET", "connections?identity=bob")
    assert body["connections"] == []

    async with aiohttp.ClientSession() as c:  # cached in this process before the revoke
        assert (await c.get(gw.url / "fake/stream",
                            headers={"Authorization": f"Bearer {key}"})).status == 200
    status, body, _ = await call(gw, "DELETE", "connections/alice/fake")
    assert status == 200 and body["revoked_at_provider"] is True
    assert gw.auth.hits["revoke"] == 2  # refresh token, then access token
    async with aiohttp.ClientSession() as c:
        r = await c.get(gw.url / "fake/stream", headers={"Authorization": f"Bearer {key}"})
        assert r.headers["Gateway-Error"] == "consent_required"  # nothing cached survived

    status, body, _ = await call(gw, "GET", "audit?identity=alice&since=1h")
    kinds = [(e["kind"], e["outcome"], e["provider"]) for e in body["events"]]
    assert ("connection.revoked", "ok", "fake") == kinds[0]  # newest first
    assert ("connection.created", "ok", "fake") in kinds
    assert ("identity.created", "ok", None) in kinds
    assert all(e["identity"] == "alice" for e in body["events"])

    # The CLI runs the same operations on the same store, with the same audit trail.
    assert (await call(gw, "GET", "connections"))[1]["connections"] == []
    assert (await gw.connect("alice", PASSWORD)).status == 200
    r = await cli("connections", "revoke", "alice", "fake", "--config", str(gw.config.source))
    assert r.code == 0, r.err
    r = await cli("audit", "--identity", "alice", "--config", str(gw.config.source))
    assert r.code == 0, r.err
    revoked = [ln for ln in r.out.splitlines() if "connection.revoked" in ln]
    assert len(revoked) == 2 and all("alice" in ln and "fake" in ln for ln in revoked)
