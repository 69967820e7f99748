"""The dashboard: every provider's state for the identity, the calling panel, and keys."""

from __future__ import annotations

import re
from typing import Any

from tests.integration.conftest import Gateway
from tests.web.conftest import PW, csrf_of, dashboard, logged_in, seed_connection

PROVIDERS = {
    "broken": {"upstream": "http://127.0.0.1:9/api"},  # no endpoints, no client: not usable
    "machine": {"grant": "client_credentials", "token_url": "http://127.0.0.1:9/token",
                "client_id": "m", "client_secret": "s", "upstream": "http://127.0.0.1:9/api"},
}


def _row(html: str, name: str) -> str:
    found = re.search(rf'<li class="provider" id="provider-{name}".*?</li>', html, re.S)
    assert found, name
    return found.group(0)


async def test_every_state_is_shown(make_gateway: Any) -> None:
    extra = {"other": {"authorize_url": "http://127.0.0.1:9/a", "token_url": "http://127.0.0.1:9/t",
                       "client_id": "c", "client_secret": "s", "upstream": "http://127.0.0.1:9/"}}
    gw: Gateway = await make_gateway(config={"providers": {**PROVIDERS, **extra}})
    browser = await logged_in(gw, "alice")
    await seed_connection(gw, "alice", scopes=("read", "write"))
    await seed_connection(gw, "alice", "other", status="reconsent_required")
    status, html = await dashboard(gw, browser)
    assert status == 200

    fake = _row(html, "fake")
    assert 'data-state="connected"' in fake and "alice-acct" in fake
    assert "<code class=\"scope\">read</code>" in fake and "Last refresh" in fake
    assert "Token expires" in fake and "UTC" in fake
    assert ">Reconnect</button>" in fake and ">Disconnect</button>" in fake

    other = _row(html, "other")
    assert 'data-state="reconsent"' in other and "Reconsent required" in other
    assert ">Reconnect</button>" in other

    broken = _row(html, "broken")
    assert 'data-state="unusable"' in broken and "client_id is not set" in broken
    assert "<button" not in broken

    machine = _row(html, "machine")
    assert 'data-state="app"' in machine and "<button" not in machine

    # The calling panel has a curl line for each provider that can be called now.
    base = str(gw.url)
    assert f"{base}/fake/&lt;path&gt;" in html and f"{base}/machine/&lt;path&gt;" in html
    assert f"{base}/broken/" not in html and f"{base}/other/" not in html
    # Secrets of the connection never reach the page.
    conn = await gw.services.store.get_connection(1, "fake")
    assert conn is not None and conn.tokens.access_token not in html
    assert conn.tokens.refresh_token not in html  # type: ignore[operator]


async def test_not_connected_offers_connect(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    browser = await logged_in(gw, "bob")
    _, html = await dashboard(gw, browser)
    fake = _row(html, "fake")
    assert 'data-state="none"' in fake and ">Connect</button>" in fake
    assert "Disconnect" not in fake
    assert "&lt;provider&gt;/&lt;path&gt;" in html  # nothing callable yet: the generic line


async def test_keys_are_created_shown_once_and_revoked(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    browser = await logged_in(gw, "carol")
    await seed_connection(gw, "carol")
    _, html = await dashboard(gw, browser)
    token = csrf_of(html)
    created = await browser.post(gw.url / "_gateway/keys", data={"csrf": token})
    page = await created.text()
    assert created.headers["Cache-Control"] == "no-store"
    key = re.search(r'<code id="new-key">([^<]+)</code>', page).group(1)  # type: ignore[union-attr]
    prefix = key[:12]
    async with gw.client() as program:
        call = await program.get(gw.url / "fake/x", headers={"Authorization": f"Bearer {key}"})
        assert call.status == 200

    _, later = await dashboard(gw, browser)
    assert key not in later and f"{prefix}…" in later  # shown once, then only its prefix

    revoked = await browser.post(gw.url / "_gateway/keys/revoke",
                                 data={"csrf": token, "prefix": prefix})
    text = await revoked.text()
    assert revoked.status == 200 and f"Key {prefix}… revoked" in text
    async with gw.client() as program:
        call = await program.get(gw.url / "fake/x", headers={"Authorization": f"Bearer {key}"})
        assert call.status == 401

    again = await browser.post(gw.url / "_gateway/keys/revoke",
                               data={"csrf": token, "prefix": prefix})
    assert again.status == 400 and "unknown or already revoked" in await again.text()
    junk = await browser.post(gw.url / "_gateway/keys/revoke",
                              data={"csrf": token, "prefix": "<script>"})
    assert junk.status == 400 and "<script>" not in await junk.text()


async def test_cannot_revoke_someone_elses_key(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    await gw.identity("dave", PW)
    [daves] = await gw.services.identities.list_keys("dave")
    mallory = await logged_in(gw, "mallory")
    _, html = await dashboard(gw, mallory)
    resp = await mallory.post(gw.url / "_gateway/keys/revoke",
                              data={"csrf": csrf_of(html), "prefix": daves.prefix})
    assert resp.status == 400
    [still] = await gw.services.identities.list_keys("dave")
    assert still.revoked_at is None


async def test_disconnect_without_a_connection_says_so(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    browser = await logged_in(gw, "erin")
    _, html = await dashboard(gw, browser)
    resp = await browser.post(gw.url / "_gateway/disconnect/fake", data={"csrf": csrf_of(html)})
    assert resp.status == 200 and "fake was not connected" in await resp.text()
    assert gw.auth.hits["revoke"] == 0


async def test_names_are_escaped(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    browser = await logged_in(gw, "frank")
    _, html = await dashboard(gw, browser)
    resp = await browser.post(gw.url / "_gateway/disconnect/%3Cb%3Ex", data={"csrf": csrf_of(html)})
    assert "<b>x" not in await resp.text()
