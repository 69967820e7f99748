"""Fixtures and helpers for the web console's tests: the real app (``make_gateway`` from the
integration harness) driven over HTTP by a cookie-keeping client."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from yarl import URL

from gateway.store.base import Connection, TokenFields
from tests.integration.conftest import Gateway, make_gateway

__all__ = ["make_gateway"]

PW = "correct horse battery"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, html
    return found.group(1)


async def logged_in(gw: Gateway, name: str, password: str = PW, *,
                    create: bool = True, **client_kw: Any) -> aiohttp.ClientSession:
    """A browser-like client logged in as ``name`` (created first unless ``create=False``)."""
    if create:
        await gw.identity(name, password)
    browser = gw.client(**client_kw)
    resp = await gw.login(browser, name, password)
    assert resp.status == 303, await resp.text()
    return browser


async def dashboard(gw: Gateway, browser: aiohttp.ClientSession) -> tuple[int, str]:
    resp = await browser.get(gw.url / "_gateway/", allow_redirects=False)
    return resp.status, await resp.text()


async def seed_connection(gw: Gateway, identity: str, provider: str = "fake", *,
                          scopes: tuple[str, ...] = ("read", "write"),
                          status: str = "active") -> Connection:
    """A stored connection holding real tokens of the fake server, without a consent flow."""
    found = await gw.services.store.get_identity(identity)
    assert found is not None
    body = gw.auth.issue_tokens(identity, scopes=scopes)
    now = gw.clock()
    tokens = TokenFields(access_token=body["access_token"], refresh_token=body["refresh_token"],
                         expires_at=now + body["expires_in"], scopes=scopes)
    conn = await gw.services.store.put_connection(found.id, provider, tokens, f"{identity}-acct",
                                                  now)
    if status != "active":
        changed = await gw.services.store.set_status(found.id, provider, status, now)  # type: ignore[arg-type]
        assert changed is not None
        return changed
    return conn


def cookie_headers(resp: aiohttp.ClientResponse, name: str) -> list[str]:
    """The raw Set-Cookie lines for ``name`` (the jar hides their attributes)."""
    return [v for v in resp.headers.getall("Set-Cookie", []) if v.startswith(f"{name}=")]


def location(resp: aiohttp.ClientResponse) -> str:
    return resp.headers.get("Location", "")


def same_origin_path(url: str) -> bool:
    """True when a Location stays on the gateway (relative path, no scheme, no host)."""
    u = URL(url)
    return not u.is_absolute() and url.startswith("/") and not url.startswith("//")
