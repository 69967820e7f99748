"""SPEC invariant 1, every direction at once: run every flow, then look for every secret used
in the logs, the metrics, every response header and body the gateway sent, every request
the upstreams and the authorization server received, and the raw bytes of the database
files (main file, WAL and shared memory) while the gateway still has them open, and the main
file again after a checkpoint has moved every page into it.

Secrets: gateway keys (every one made), the password, the client secret, the encryption key
(text and raw bytes), the keys derived from it or pinned in the store (connect links, flow
cookies, key hashing: raw and hex), every access and refresh token the provider issued,
every authorization code, PKCE verifier and state, and the browser session cookies.

tests/ops/test_secrets.py scans logs, metrics and responses for the operations flows; this
adds the raw database, the upstream and provider directions, the derived keys, and PKCE.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from yarl import URL

from gateway.accesslog import StructuredFormatter
from gateway.tokens.crypto import decode_key
from tests.fakes.authserver import DEFAULT_CLIENT_SECRET
from tests.security.conftest import PASSWORD, SecureGateway

COOKIES = ("gateway_session", "gateway_flow_")


class Recorder:
    """Every response a client session received, body included."""

    def __init__(self) -> None:
        self.responses: list[tuple[str, int, list[tuple[str, str]], bytes]] = []

    def response_class(self) -> type[aiohttp.ClientResponse]:
        recorder = self

        class Recording(aiohttp.ClientResponse):
            async def start(self, connection: Any) -> aiohttp.ClientResponse:
                await super().start(connection)
                body = await self.read()
                recorder.responses.append((str(self.url), self.status,
                                           list(self.headers.items()), body))
                return self

        return Recording


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


async def _flows(gw: SecureGateway, rec: Recorder) -> list[str]:
    """Everything a person, a program and the provider do; returns the keys made."""
    kw: dict[str, Any] = {"response_class": rec.response_class()}
    key = await gw.identity("alice", PASSWORD)
    gw.key = key
    auth = {"Authorization": f"Bearer {key}"}
    browser, api = gw.client(**kw), gw.client(**kw)
    assert (await gw.login(gw.client(**kw), "alice", "wrong password")).status == 401
    assert (await gw.login(browser, "alice", PASSWORD)).status == 303
    for provider in ("fake", "rec"):  # consent from the dashboard, PKCE required
        start = await browser.get(gw.url / f"_gateway/connect/{provider}", allow_redirects=False)
        assert (await gw.follow_to_callback(browser, start.headers["Location"])).status == 200
    # Consent through a connect link, confirmed in the logged-in browser.
    offer = await (await api.post(gw.url / "_gateway/api/connect/two", headers=auth)).json()
    page = await (await browser.get(offer["connect_url"])).text()
    token = re.search(r'name="link" value="([^"]+)"', page)
    assert token, page[:500]
    go = await browser.post(gw.url / "_gateway/connect/two", allow_redirects=False,
                            data={"link": token.group(1), "csrf": _csrf(page)})
    assert (await gw.follow_to_callback(browser, go.headers["Location"])).status == 200
    # Programs: every shape of proxied call.
    for method, path, body in [("GET", "fake/data", None), ("POST", "fake/upload", b"x" * 100),
                               ("PUT", "fake/upload", b"y" * 300_000), ("GET", "fake/gzip", None),
                               ("GET", "rec/x?q=1", None), ("DELETE", "two/y", None)]:
        await api.request(method, gw.url / path, headers=auth, data=body)
    await api.get(gw.url / "fake/stream", params={"bytes": "1000"},
                  headers={"Proxy-Authorization": f"Bearer {key}"})
    # Refreshes: proactive, reactive (the upstream refuses the token), failed, refused.
    gw.clock.advance(7200)
    await api.get(gw.url / "fake/data", headers=auth)
    await api.get(gw.url / "fake/protected", headers=auth)
    gw.clock.advance(7200)
    gw.auth.fail_next(1, status=503)
    await api.get(gw.url / "fake/data", headers=auth)
    gw.auth.fail_next(1, status=400, body='{"error": "invalid_grant"}')
    await api.get(gw.url / "fake/data", headers=auth)
    start = await browser.get(gw.url / "_gateway/connect/fake", allow_redirects=False)
    await gw.follow_to_callback(browser, start.headers["Location"])
    # Keys from the dashboard; bad credentials of every kind.
    dash = await (await browser.get(gw.url / "_gateway/")).text()
    made = await (await browser.post(gw.url / "_gateway/keys", data={"csrf": _csrf(dash)})).text()
    second = re.search(r"gwk_[A-Za-z0-9_-]{20,}", made)
    assert second, made[:500]
    await api.get(gw.url / "fake/data", headers={"Authorization": f"Bearer {second.group(0)}"})
    await browser.post(gw.url / "_gateway/keys/revoke",
                       data={"csrf": _csrf(made), "prefix": second.group(0)[:12]})
    for bad in (key + "x", "gwk_" + "A" * 43, second.group(0)):
        await api.get(gw.url / "fake/data", headers={"Authorization": f"Bearer {bad}"})
    await api.get(gw.url / "_gateway/callback", params={"state": "forged", "code": "forged"})
    # Disconnect, log out, and the operator's view.
    await browser.post(gw.url / "_gateway/disconnect/two", data={"csrf": _csrf(made)})
    await browser.post(gw.url / "_gateway/logout", data={"csrf": _csrf(made)})
    await api.get(gw.url / "_gateway/readyz")
    return [key, second.group(0)]


def _secrets(gw: SecureGateway, keys: list[str], rec: Recorder) -> dict[str, str | bytes]:
    found: dict[str, str | bytes] = {f"gateway key {i}": k for i, k in enumerate(keys)}
    found["password"] = PASSWORD
    found["client secret"] = DEFAULT_CLIENT_SECRET
    assert gw.config.encryption_key
    found["encryption key"] = gw.config.encryption_key
    found["encryption key bytes"] = decode_key(gw.config.encryption_key)
    consent: Any = gw.services.consent
    identities: Any = gw.services.identities
    for name, raw in (("link key", consent._link_key), ("flow key", consent._flow_key),
                      ("key-hash key", identities._mac_key)):
        found[name], found[name + " hex"] = cast(bytes, raw), cast(bytes, raw).hex()
    for i, t in enumerate(gw.auth.access_tokens):
        found[f"access token {i}"] = t
    for i, t in enumerate(gw.auth.refresh_tokens):
        found[f"refresh token {i}"] = t
    for i, c in enumerate(gw.auth.codes):
        found[f"code {i}"] = c
    for i, r in enumerate(gw.auth.requests):
        if r.params.get("code_verifier"):
            found[f"verifier {i}"] = r.params["code_verifier"]
        if r.endpoint == "authorize" and r.params.get("state"):
            found[f"state {i}"] = r.params["state"]
    for url, _, headers, _ in rec.responses:
        for name, value in headers:
            if name.lower() == "set-cookie" and value.startswith(COOKIES):
                cookie = value.split(";", 1)[0].split("=", 1)[1].strip('"')
                if cookie and URL(url).port == gw.port:
                    found[f"cookie {value.split('=', 1)[0]} {len(found)}"] = cookie
    counts = {kind: sum(k.startswith(kind) for k in found)
              for kind in ("access token", "refresh token", "verifier", "state", "cookie")}
    assert min(counts.values()) >= 3, counts  # the flows really ran
    return found


def _allowed(where: str, name: str, url: str, status: int) -> bool:
    """What a response must carry: its own cookie, the state in the redirect to the provider,
    a new key on the page that makes it."""
    if where == "set-cookie":
        return name.startswith("cookie")
    if where == "location":
        return name.startswith("state")
    return where == "body" and name == "gateway key 1" and url.endswith("/_gateway/keys")


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _db_files(path: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in path.parent.iterdir()
             if p.is_file() and p.name.startswith(path.name)}
    assert path.name in files and path.name + "-wal" in files, sorted(files)
    return files


@pytest.mark.timeout(60)
async def test_no_secret_anywhere_after_every_flow(secure_gateway: Any,
                                                   logs: pytest.LogCaptureFixture) -> None:
    gw: SecureGateway = await secure_gateway(require_pkce=True)
    rec = Recorder()
    keys = await _flows(gw, rec)
    async with aiohttp.ClientSession() as s, s.get(gw.url / "_gateway/metrics") as r:
        metrics = await r.text()
    await gw.services.audit.flush()
    secrets = _secrets(gw, keys, rec)
    db = _db_files(gw.db_path)  # read while the gateway holds them open: WAL not checkpointed
    with contextlib.closing(sqlite3.connect(gw.db_path)) as other:  # then the same, moved
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")            # into the main file
    db["gateway.db after a checkpoint"] = gw.db_path.read_bytes()
    assert len(db["gateway.db after a checkpoint"]) > 50_000

    formatter = StructuredFormatter("json")
    logged = "\n".join([logs.text, *(formatter.format(r) for r in logs.records)])
    assert len(logs.records) > 50
    assert gw.rec is not None and gw.two is not None
    upstream_saw = "\n".join(repr(r.as_json()) for r in gw.upstream.requests) + "\n".join(
        repr(h) for h in [*gw.rec.hits, *gw.two.hits])
    provider_saw = "\n".join(f"{r.headers!r} {r.params!r}" for r in gw.auth.requests)
    # What the gateway itself said: its pages and API, and its own errors on proxied paths
    # (an upstream's answer passes through unchanged; the fake upstream echoes the token).
    ours = [r for r in rec.responses if URL(r[0]).port == gw.port and (
        URL(r[0]).path.startswith("/_gateway/")
        or any(k.lower() == "gateway-error" for k, _ in r[2]))]
    assert len(ours) > 20

    for name, value in secrets.items():
        raw = _as_bytes(value)
        for file, data in db.items():
            assert raw not in data, f"{name} in plain text in {file}"
        if isinstance(value, bytes):
            continue
        assert value not in logged, f"{name} logged"
        assert value not in metrics, f"{name} in the metrics"
        for url, status, headers, body in ours:
            for where, content in [*((k.lower(), v) for k, v in headers),
                                   ("body", body.decode("latin-1"))]:
                if value in content and not _allowed(where, name, url, status):
                    raise AssertionError(f"{name} sent to a client in {where} of {status} {url}")
        if not name.startswith(("access token", "code", "verifier", "state", "refresh token",
                                "client secret")):
            # Only what the protocol needs goes to the provider: never our own secrets.
            assert value not in provider_saw, f"{name} sent to the authorization server"
        if not name.startswith("access token"):
            assert value not in upstream_saw, f"{name} sent to an upstream"
