"""SPEC invariant 1 end to end: run every flow, then search every log line, the metrics and
every response the gateway sent for every secret that was used."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.accesslog import StructuredFormatter
from tests.fakes.authserver import DEFAULT_CLIENT_SECRET
from tests.integration.conftest import Gateway
from tests.ops.conftest import ADMIN_KEY, PASSWORD, RecordedResponse, Recorder, scrape

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# The login form's double-submit CSRF cookie is echoed in the form by design: not a secret.
SESSION_COOKIES = ("gateway_session", "gateway_flow_")


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html
    return m.group(1)


async def _connect(gw: Gateway, browser: aiohttp.ClientSession, login: bool = False) -> None:
    if login:
        assert (await gw.login(browser, "alice", PASSWORD)).status == 303
    start = await browser.get(gw.url / "_gateway/connect/fake", allow_redirects=False)
    assert start.status == 302
    done = await gw.follow_to_callback(browser, start.headers["Location"])
    assert done.status == 200, await done.text()


async def _flows(gw: Gateway, rec: Recorder) -> dict[str, str]:
    """Everything an operator and a client would do; returns secrets not held by the fakes."""
    kw: dict[str, Any] = {"response_class": rec.response_class()}
    key = await gw.identity("alice", PASSWORD)
    auth = {"Authorization": f"Bearer {key}"}
    browser = gw.client(**kw)
    bad = gw.client(**kw)
    assert (await gw.login(bad, "alice", "not the password")).status == 401
    await _connect(gw, browser, login=True)
    api = gw.client(**kw)
    # Admin API: an identity whose key comes back in the body, keys, listings, audit.
    r = await api.post(gw.url / "_gateway/api/admin/identities", headers=ADMIN,
                       json={"name": "bob", "password": PASSWORD + "!"})
    bob_key = (await r.json())["key"]
    r = await api.post(gw.url / "_gateway/api/admin/identities/alice/keys", headers=ADMIN)
    extra_key = (await r.json())["key"]
    await api.delete(gw.url / f"_gateway/api/admin/identities/alice/keys/{extra_key[:12]}",
                     headers=ADMIN)
    # Programs: connect links, proxied calls (sized, streamed, compressed, with bodies).
    await api.post(gw.url / "_gateway/api/connect/fake", headers=auth)
    await api.get(gw.url / "fake/stream", params={"bytes": "100"},
                  headers={**auth, "X-Request-Id": "scan-1"})
    await api.get(gw.url / "fake/gzip", headers={"Proxy-Authorization": f"Bearer {key}"})
    await api.post(gw.url / "fake/stream", data=b"x" * 100, headers=auth)
    await api.put(gw.url / "fake/stream", data=b"y" * 200_000, headers=auth)  # streams
    # Refresh: proactive (expired), reactive (upstream 401), failed, and re-consent.
    gw.clock.advance(7200)
    await api.get(gw.url / "fake/stream", headers=auth)
    gw.upstream.accepted_tokens.clear()
    await api.get(gw.url / "fake/protected", headers=auth)
    gw.clock.advance(7200)
    gw.auth.fail_next(1, status=503)
    await api.get(gw.url / "fake/stream", headers=auth)
    gw.auth.fail_next(1, status=400, body='{"error": "invalid_grant"}')
    await api.get(gw.url / "fake/stream", headers=auth)
    # Bad credentials of every kind.
    await api.get(gw.url / "fake/stream", headers={"Authorization": f"Bearer {key}x"})
    await api.get(gw.url / "fake/stream", headers={"Authorization": "Bearer gwk_" + "A" * 43})
    await api.get(gw.url / "_gateway/api/admin/audit",
                  headers={"Authorization": f"Bearer {ADMIN_KEY[:-2]}"})
    # Reconnect, then revoke through the admin API; reconnect, disconnect on the dashboard.
    await _connect(gw, browser)
    await api.delete(gw.url / "_gateway/api/admin/connections/alice/fake", headers=ADMIN)
    await _connect(gw, browser)
    dash = await (await browser.get(gw.url / "_gateway/")).text()
    await browser.post(gw.url / "_gateway/disconnect/fake", data={"csrf": _csrf(dash)})
    await browser.post(gw.url / "_gateway/logout", data={"csrf": _csrf(dash)})
    # Operators' reads.
    for path in ("identities", "connections", "audit", "identities/alice/keys"):
        await api.get(gw.url / "_gateway/api/admin" / path, headers=ADMIN)
    await api.get(gw.url / "_gateway/readyz")
    return {"alice key": key, "bob key": bob_key, "second key": extra_key}


def _secrets(gw: Gateway, ours: dict[str, str], responses: list[RecordedResponse]
             ) -> dict[str, str]:
    found = dict(ours)
    found["password"] = PASSWORD
    found["client secret"] = DEFAULT_CLIENT_SECRET
    found["admin key"] = ADMIN_KEY
    found["encryption key"] = gw.config.encryption_key or ""
    for i, t in enumerate(gw.auth.access_tokens):
        found[f"access token {i}"] = t
    for i, t in enumerate(gw.auth.refresh_tokens):
        found[f"refresh token {i}"] = t
    for i, c in enumerate(gw.auth.codes):
        found[f"code {i}"] = c
    for i, req in enumerate(gw.auth.requests):
        if req.params.get("code_verifier"):
            found[f"verifier {i}"] = req.params["code_verifier"]
        if req.endpoint == "authorize" and req.params.get("state"):
            found[f"state {i}"] = req.params["state"]
    for resp in responses:
        for name, value in resp.headers:
            if name.lower() == "set-cookie" and value.startswith(SESSION_COOKIES):
                cookie = value.split(";", 1)[0].split("=", 1)[1].strip('"')
                if cookie:  # (a deletion sets it empty)
                    found[f"cookie {value.split('=', 1)[0]}"] = cookie
    assert sum(k.startswith("access token") for k in found) >= 5  # the flows really ran
    assert sum(k.startswith("verifier") for k in found) >= 3
    assert any(k.startswith("cookie gateway_session") for k in found)
    return {k: v for k, v in found.items() if v}


def _allowed(resp: RecordedResponse, where: str, name: str, secrets: dict[str, str]) -> bool:
    """Secrets a response must carry: a cookie in its Set-Cookie, the state in the redirect
    to the provider, a new key in the answer that creates it."""
    if where.lower() == "set-cookie":
        return name.startswith("cookie")
    if where.lower() == "location":
        return name.startswith("state")
    if where == "body" and resp.status == 201 and "/_gateway/api/admin/" in resp.url:
        return name in ("bob key", "second key")
    return False


async def test_no_secret_in_logs_metrics_or_responses(ops_gateway: Any,
                                                      logs: pytest.LogCaptureFixture) -> None:
    gw: Gateway = await ops_gateway(require_pkce=True)
    rec = Recorder()
    ours = await _flows(gw, rec)
    metrics = await scrape(gw)
    await gw.services.audit.flush()
    from_gateway = [r for r in rec.responses if URL(r.url).port == gw.url.port]
    secrets = _secrets(gw, ours, from_gateway)

    records = list(logs.records)
    assert len(records) > 100
    formatter = StructuredFormatter("json")
    texts = [r.getMessage() for r in records] + [formatter.format(r) for r in records]
    texts.append(logs.text)
    for name, value in secrets.items():
        for text in texts:
            assert value not in text, f"{name} logged: {text[:300]}"
        assert value not in metrics, f"{name} in metrics"
        for audit_event in await gw.services.store.list_audit():
            assert value not in repr(audit_event), f"{name} in the audit trail"
        for resp in from_gateway:
            for where, content in [*resp.headers, ("body", resp.body.decode("latin-1"))]:
                if value in content and not _allowed(resp, where, name, secrets):
                    raise AssertionError(f"{name} sent to the client in {where} of "
                                         f"{resp.status} {resp.url}")
