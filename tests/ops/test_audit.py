"""The audit trail: every connection, key and login event, queryable, and purged on time."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.app import OpsSettings, housekeep
from gateway.audit import AuditLog, parse_since, retention_cutoff
from gateway.errors import BadRequest, StoreUnavailable
from gateway.store.base import AuditEvent
from tests.integration.conftest import Gateway
from tests.ops.conftest import ADMIN_KEY, PASSWORD

NOW = 1_700_000_000.0


@pytest.mark.parametrize("text, expected", [
    ("90s", NOW - 90), ("15m", NOW - 900), ("24h", NOW - 86400), ("7d", NOW - 7 * 86400),
    ("2w", NOW - 14 * 86400), ("1.5h", NOW - 5400), (" 24H ", NOW - 86400),
    ("2023-11-14T22:13:20Z", NOW), ("2023-11-14T23:13:20+01:00", NOW),
    ("2023-11-14T22:13:20", NOW),  # no offset: UTC
    ("2023-11-14", datetime(2023, 11, 14, tzinfo=UTC).timestamp()),
])
def test_since_accepts_iso_times_and_durations(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "yesterday", "24", "-5h", "5y", "2023-13-40"])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_since(text, NOW)
    assert "24h" in err.value.message


def test_retention_cutoff() -> None:
    assert retention_cutoff(NOW, 30) == NOW - 30 * 86400
    assert retention_cutoff(NOW, None) is None
    assert retention_cutoff(NOW, 0) is None


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html
    return m.group(1)


async def test_every_flow_leaves_its_event(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    key = await gw.identity("alice", PASSWORD)
    bad = gw.client()
    assert (await gw.login(bad, "alice", "wrong password!")).status == 401
    assert (await gw.connect("alice", PASSWORD)).status == 200  # logs in, consents
    auth = {"Authorization": f"Bearer {key}"}
    async with gw.client() as c:
        gw.clock.advance(7200)
        assert (await c.get(gw.url / "fake/stream", headers=auth)).status == 200
        gw.clock.advance(7200)
        gw.auth.fail_next(1, status=503)
        assert (await c.get(gw.url / "fake/stream", headers=auth)).status == 503
        gw.auth.fail_next(1, status=400, body='{"error": "invalid_grant"}')
        assert (await c.get(gw.url / "fake/stream", headers=auth)).status == 401
    # The test clock stands still between advances, so events tie on time and list in
    # insertion order: let queued events land before the next direct writes.
    await gw.services.audit.flush()
    browser = gw.client()
    await gw.login(browser, "alice", PASSWORD)
    dash = await (await browser.get(gw.url / "_gateway/")).text()
    r = await browser.post(gw.url / "_gateway/disconnect/fake", data={"csrf": _csrf(dash)})
    assert r.status == 200
    await gw.services.audit.flush()
    second = await gw.services.identities.add_key("alice")
    await gw.services.identities.revoke_key("alice", second[:12])

    events = list(reversed(await gw.services.audit.query(identity="alice")))
    got = [(e.kind, e.outcome, e.provider) for e in events]
    assert got == [
        ("identity.created", "ok", None),
        ("login.failed", "failed", None),
        ("login.succeeded", "ok", None),
        ("connection.created", "ok", "fake"),
        ("connection.refreshed", "ok", "fake"),
        ("connection.refresh_failed", "failed", "fake"),
        ("connection.reconsent_required", "reconsent_required", "fake"),
        ("login.succeeded", "ok", None),
        ("connection.revoked", "ok", "fake"),
        ("key.created", "ok", None),
        ("key.revoked", "ok", None),
    ]
    assert all(e.identity == "alice" for e in events)
    assert all(e.at > 0 for e in events)
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert events[-1].detail == f"prefix={second[:12]}"  # a prefix, never the key
    for e in events:
        assert key not in (e.detail or "") and second not in (e.detail or "")


async def test_failed_consent_is_audited(ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    gw.auth.deny = True
    await gw.identity("bob", PASSWORD)
    assert (await gw.connect("bob", PASSWORD)).status == 400
    [event] = [e for e in await gw.services.audit.query(identity="bob")
               if e.kind == "consent.failed"]
    assert event.outcome == "failed" and event.provider == "fake"


async def test_queue_survives_a_store_failure_and_drops_oldest_when_full(
        ops_gateway: Any) -> None:
    gw: Gateway = await ops_gateway()
    store = gw.services.store
    log = AuditLog(store, gw.clock, max_pending=3)
    for i in range(5):
        log.record("test.event", "ok", identity=f"u{i}")
    assert log.dropped == 2
    assert await log.flush() == 3
    assert [e.identity for e in await store.list_audit()][:3] == ["u4", "u3", "u2"]
    await store.close()
    log.record("test.event", "ok", identity="late")
    with pytest.raises(StoreUnavailable):
        await log.flush()
    await store.open()
    assert await log.flush() == 1  # kept, written once the store is back
    assert (await store.list_audit(identity="late"))[0].kind == "test.event"


@pytest.mark.parametrize("days, kept", [(30.0, ["new"]), (None, ["new", "old"])])
async def test_housekeeping_purges_by_retention(ops_gateway: Any, days: float | None,
                                                kept: list[str]) -> None:
    gw: Gateway = await ops_gateway(ops=OpsSettings(admin_key=ADMIN_KEY,
                                                    audit_retention_days=days))
    store = gw.services.store
    await store.add_audit(AuditEvent(at=gw.clock() - 40 * 86400, kind="k", outcome="ok",
                                     identity="old"))
    await store.add_audit(AuditEvent(at=gw.clock() - 86400, kind="k", outcome="ok",
                                     identity="new"))
    await housekeep(gw.app)
    assert [e.identity for e in await store.list_audit()] == kept


async def test_cli_audit(ops_gateway: Any, cli: Any) -> None:
    gw: Gateway = await ops_gateway()
    await gw.identity("alice", PASSWORD)
    await gw.identity("bob", PASSWORD)
    conf = ["--config", str(gw.config.source)]
    r = await cli("audit", *conf)
    assert r.code == 0, r.err
    header, *rows = r.out.splitlines()
    assert header.split() == ["TIME", "KIND", "OUTCOME", "IDENTITY", "PROVIDER", "DETAIL"]
    assert [row.split()[2] for row in rows] == ["identity.created"] * 2  # oldest first
    r = await cli("audit", "--identity", "bob", "--since", "1h", "--json", *conf)
    assert r.code == 0, r.err
    [event] = [json.loads(line) for line in r.out.splitlines()]
    assert event["identity"] == "bob" and event["kind"] == "identity.created"
    r = await cli("audit", "--since", "2999-01-01", *conf)
    assert r.code == 0 and r.out.splitlines()[1:] == []
    r = await cli("audit", "--since", "last tuesday", *conf)
    assert r.code == 2 and "--since" in r.err
    r = await cli("audit", "--identity", "not a name", *conf)
    assert r.code == 2
