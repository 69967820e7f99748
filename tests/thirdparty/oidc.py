"""Run panva's oidc-provider (a certified OpenID Provider) as a subprocess, and act as a browser.

Why a third party: ``tests/fakes`` encodes our own reading of RFC 6749/7636/7009, so a
misreading there and in the gateway would agree with each other. oidc-provider is someone
else's reading; where it and the gateway disagree, one of us is wrong and a test says so.

This module is importable from any test (``from tests.thirdparty.oidc import ...``); the
fixtures in ``tests/thirdparty/conftest.py`` are thin wrappers around :func:`start_oidc_provider`.

Theory of operation: ``oidc_server.mjs`` binds 127.0.0.1:0 and prints ``LISTENING <issuer>``
as its first stdout line; we wait for that line (bounded by a deadline, no sleeps), then read
the discovery document. Its stderr goes to a log file whose tail is shown when startup fails.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import aiohttp
from yarl import URL

from gateway.config import ProviderConfig

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "oidc_server.mjs"
NODE_MODULES = HERE / "node_modules"
INSTALL_HINT = "npm ci --prefix tests/thirdparty"
# RFC 6749 §2.3.1 makes both sides form-encode id and secret before base64 in Basic auth; a
# secret with ':' '%' '+' ' ' (all VSCHAR, Appendix A.2) breaks any side that skips that step.
SPECIAL_SECRET = "p:ss%41 w+rd&=/?"
# Nothing listens here: flows stop at the redirect and never fetch it.
REDIRECT_URI = "http://127.0.0.1:9/callback"
STARTUP_TIMEOUT = 20.0


class OidcUnavailable(RuntimeError):
    """node or the npm packages are missing (tests skip, or fail under CI)."""


@dataclass(frozen=True, slots=True)
class OidcClient:
    """One registered client, as the gateway would be configured for it."""

    client_id: str
    client_secret: str = field(repr=False)
    redirect_uri: str
    auth_method: str = "client_secret_basic"
    grant_types: tuple[str, ...] = ("authorization_code", "refresh_token")
    native: bool = False

    def metadata(self) -> dict[str, Any]:
        """RFC 7591 client metadata for ``OIDC_CLIENTS``."""
        meta: dict[str, Any] = {
            "client_id": self.client_id,
            "redirect_uris": [self.redirect_uri] if "authorization_code" in self.grant_types
            else [],
            "token_endpoint_auth_method": self.auth_method,
            "grant_types": list(self.grant_types),
            "response_types": ["code"] if "authorization_code" in self.grant_types else [],
        }
        if self.auth_method != "none":
            meta["client_secret"] = self.client_secret
        if self.native:
            # RFC 8252 §7.3: oidc-provider ignores the port of loopback redirect URIs for
            # native clients, so the gateway's port need not be known before this starts.
            meta["application_type"] = "native"
        return meta


def default_clients(redirect_uri: str) -> tuple[OidcClient, ...]:
    """Basic, post and public auth-code clients plus a client_credentials service client."""
    return (
        OidcClient("gw-basic", SPECIAL_SECRET, redirect_uri, "client_secret_basic"),
        OidcClient("gw-post", SPECIAL_SECRET, redirect_uri, "client_secret_post"),
        OidcClient("gw-public", "", redirect_uri, "none"),
        OidcClient("gw-service", "service-" + SPECIAL_SECRET, redirect_uri,
                   "client_secret_basic", grant_types=("client_credentials",)),
    )


@dataclass(frozen=True, slots=True)
class OidcProvider:
    """A running oidc-provider: issuer, discovered endpoints, and its registered clients."""

    issuer: URL
    metadata: Mapping[str, Any]
    clients: Mapping[str, OidcClient]
    access_token_ttl: int

    def endpoint(self, name: str) -> URL:
        """A discovered endpoint, e.g. ``endpoint("token_endpoint")``."""
        return URL(self.metadata[name])

    @property
    def authorization_endpoint(self) -> URL:
        return self.endpoint("authorization_endpoint")

    @property
    def token_endpoint(self) -> URL:
        return self.endpoint("token_endpoint")

    @property
    def revocation_endpoint(self) -> URL:
        return self.endpoint("revocation_endpoint")

    @property
    def introspection_endpoint(self) -> URL:
        return self.endpoint("introspection_endpoint")

    @property
    def userinfo_endpoint(self) -> URL:
        return self.endpoint("userinfo_endpoint")

    @property
    def jwks_uri(self) -> URL:
        return self.endpoint("jwks_uri")

    def provider_config(self, client_id: str, *, name: str = "oidc",
                        scopes: Sequence[str] = ("openid", "email"),
                        upstream: URL | None = None, **overrides: Any) -> ProviderConfig:
        """A gateway :class:`ProviderConfig` for one client, endpoints from discovery."""
        c = self.clients[client_id]
        fields: dict[str, Any] = {
            "name": name,
            "issuer": self.issuer,
            "authorize_url": self.authorization_endpoint,
            "token_url": self.token_endpoint,
            "revocation_url": self.revocation_endpoint,
            "upstream": upstream or self.issuer,
            "client_id": c.client_id,
            "client_secret": c.client_secret,
            "client_auth": c.auth_method,
            "grant": "client_credentials" if "authorization_code" not in c.grant_types
            else "authorization_code",
            "scopes": tuple(scopes),
        }
        if "jwks_url" in ProviderConfig.__dataclass_fields__:
            fields["jwks_url"] = self.jwks_uri
        fields.update(overrides)
        return ProviderConfig(**fields)


def check_installed() -> str:
    """Path of ``node``; raises :class:`OidcUnavailable` naming the missing piece."""
    node = shutil.which("node")
    if node is None:
        raise OidcUnavailable("node is not on PATH (needed for tests/thirdparty)")
    if not (NODE_MODULES / "oidc-provider" / "package.json").is_file():
        raise OidcUnavailable(f"tests/thirdparty/node_modules is missing; run `{INSTALL_HINT}`")
    return node


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _read_listening_line(proc: subprocess.Popen[bytes], log: Path, deadline: float) -> str:
    """Block until the first stdout line (or exit, or the deadline); return the issuer."""
    assert proc.stdout is not None
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"oidc_server.mjs did not start in time:\n{_tail(log)}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"oidc_server.mjs exited with {proc.wait()}:\n{_tail(log)}")
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    word, _, issuer = line.partition(" ")
    if word != "LISTENING" or not issuer.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"unexpected first line from oidc_server.mjs: {line!r}")
    return issuer


@contextmanager
def start_oidc_provider(log_dir: Path, clients: Sequence[OidcClient] | None = None, *,
                        redirect_uri: str = REDIRECT_URI,
                        access_token_ttl: int = 300, refresh_token_ttl: int = 86400,
                        rotate_refresh: bool = True,
                        env: Mapping[str, str] | None = None) -> Iterator[OidcProvider]:
    """Run oidc_server.mjs on a free port for the ``with`` block; stop it afterwards.

    ``clients`` defaults to :func:`default_clients` for ``redirect_uri``. Blocking (it is
    setup, not the code under test), so it also works from session-scoped sync fixtures.
    """
    node = check_installed()
    clients = tuple(clients) if clients is not None else default_clients(redirect_uri)
    child_env = {
        **os.environ,
        "OIDC_CLIENTS": json.dumps([c.metadata() for c in clients]),
        "OIDC_ACCESS_TOKEN_TTL": str(access_token_ttl),
        "OIDC_REFRESH_TOKEN_TTL": str(refresh_token_ttl),
        "OIDC_ROTATE_REFRESH": "1" if rotate_refresh else "0",
        "NO_COLOR": "1",
        **(env or {}),
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"oidc-provider-{secrets.token_hex(4)}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([node, str(SERVER_SCRIPT), "0"], cwd=HERE, env=child_env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        issuer = _read_listening_line(proc, log, time.monotonic() + STARTUP_TIMEOUT)
        with urlopen(f"{issuer}/.well-known/openid-configuration", timeout=10) as resp:
            metadata = json.load(resp)
        if metadata.get("issuer") != issuer:
            raise RuntimeError(f"discovery issuer {metadata.get('issuer')!r} != {issuer!r}")
        yield OidcProvider(issuer=URL(issuer), metadata=metadata,
                           clients={c.client_id: c for c in clients},
                           access_token_ttl=access_token_ttl)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# --------------------------------------------------------------------------- browser


class _Forms(HTMLParser):
    """Collects every <form>'s action, method and named <input> values."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""),
                               "method": a.get("method", "get").lower(), "fields": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")


def parse_forms(html: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


def browser_session() -> aiohttp.ClientSession:
    """A session that keeps cookies for 127.0.0.1 (aiohttp's default jar ignores IP hosts)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def authorize_in_browser(session: aiohttp.ClientSession, start_url: str | URL, *,
                               stop_at: str, login: str = "alice",
                               max_steps: int = 20) -> URL:
    """Follow redirects and submit oidc-provider's login/consent forms like a user would.

    Returns the first redirect target starting with ``stop_at`` (not fetched: the code in it
    is single-use). Raises AssertionError with the page text when the flow goes elsewhere.
    """
    url = URL(str(start_url), encoded=True)
    method, data = "GET", None
    for _ in range(max_steps):
        async with session.request(method, url, data=data, allow_redirects=False) as resp:
            body = await resp.text()
            if resp.status in (301, 302, 303, 307, 308):
                target = url.join(URL(resp.headers["Location"], encoded=True))
                if str(target).startswith(stop_at):
                    return target
                url, method, data = target, "GET", None
                continue
            assert resp.status == 200, f"{method} {url.path} -> {resp.status}: {body[:500]}"
        forms = [f for f in parse_forms(body) if f["method"] == "post"]
        assert forms, f"no form on {url.path}: {body[:500]}"
        fields = dict(forms[0]["fields"])
        if fields.get("prompt") == "login":
            fields.update(login=login, password="anything")  # dev interactions ignore it
        url, method, data = url.join(URL(forms[0]["action"], encoded=True)), "POST", fields
    raise AssertionError(f"no redirect to {stop_at} within {max_steps} steps")
