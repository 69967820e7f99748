"""Discovery (OIDC Discovery 1.0, RFC 8414) against real in-process servers: the fake
authorization server, and small apps of our own for the RFC 8414 fallback and for faults."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.config import Config, ProviderConfig, with_problems
from gateway.oauth import discovery
from gateway.oauth.client import OAuthClient
from gateway.oauth.discovery import (
    DiscoveryError,
    Metadata,
    apply_metadata,
    discover,
    needs_discovery,
    parse_metadata,
    resolve_providers,
    well_known_urls,
)
from gateway.oauth.protocol import TokenGrant
from tests.fakes.authserver import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeAuthServer

WriteConfig = Callable[..., Config]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class DocServer:
    """An aiohttp app serving whatever ``routes`` says per path, recording every path asked."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.paths: list[str] = []
        self.base = URL()

    def document(self, path: str, doc: Any, status: int = 200) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            body = doc if isinstance(doc, str | bytes) else json.dumps(doc)
            return web.Response(status=status, body=body, content_type="application/json")

        self.routes[path] = handler

    def metadata(self, issuer: str) -> dict[str, Any]:
        return {"issuer": issuer, "authorization_endpoint": f"{self.base}/auth",
                "token_endpoint": f"{self.base}/token", "jwks_uri": f"{self.base}/jwks",
                "revocation_endpoint": f"{self.base}/revoke"}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.raw_path)
        handler = self.routes.get(request.raw_path)
        return await handler(request) if handler else web.Response(status=404)


@pytest.fixture
async def docs(aiohttp_server: Any) -> DocServer:
    server = DocServer()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", server.handle)
    test_server = await aiohttp_server(app)
    server.base = URL(f"http://127.0.0.1:{test_server.port}")
    return server


def oidc_entry(issuer: str, **extra: Any) -> dict[str, Any]:
    return {"issuer": issuer, "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET, "upstream": "https://api.example", **extra}


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(("issuer", "oidc", "rfc8414"), [
    ("https://id.example", "https://id.example/.well-known/openid-configuration",
     "https://id.example/.well-known/oauth-authorization-server"),
    ("https://id.example/", "https://id.example/.well-known/openid-configuration",
     "https://id.example/.well-known/oauth-authorization-server"),
    ("https://id.example/tenant/v2.0",
     "https://id.example/tenant/v2.0/.well-known/openid-configuration",
     "https://id.example/.well-known/oauth-authorization-server/tenant/v2.0"),
    ("http://127.0.0.1:8080/realms/a%20b/",
     "http://127.0.0.1:8080/realms/a%20b/.well-known/openid-configuration",
     "http://127.0.0.1:8080/.well-known/oauth-authorization-server/realms/a%20b"),
])
def test_well_known_locations(issuer: str, oidc: str, rfc8414: str) -> None:
    """OIDC Discovery §4.1 appends; RFC 8414 §3.1 inserts before the issuer's path."""
    assert tuple(map(str, well_known_urls(URL(issuer)))) == (oidc, rfc8414)


GOOD = {"issuer": "https://id.example", "authorization_endpoint": "https://id.example/a",
        "token_endpoint": "https://id.example/t", "code_challenge_methods_supported": ["S256"]}


def test_a_good_document_parses() -> None:
    meta = parse_metadata(json.dumps(GOOD).encode(), issuer="https://id.example", source="s")
    assert meta.token_endpoint == URL("https://id.example/t") and meta.revocation_endpoint is None
    assert meta.code_challenge_methods_supported == ("S256",)
    assert meta.token_endpoint_auth_methods_supported is None  # omitted is not empty


@pytest.mark.parametrize(("body", "words"), [
    (json.dumps({**GOOD, "issuer": "https://id.example/"}), "must be identical"),
    (json.dumps({**GOOD, "issuer": "https://evil.example"}), "must be identical"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "issuer"}), "must be identical"),
    ("<html>hello</html>", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({**GOOD, "token_endpoint": "http://id.example/t"}), "not an https URL"),
    (json.dumps({**GOOD, "token_endpoint": "/t"}), "not an absolute"),
    (json.dumps({**GOOD, "jwks_uri": 7}), "not a string"),
    (json.dumps({**GOOD, "code_challenge_methods_supported": "S256"}), "list of strings"),
])
def test_bad_documents_are_refused_with_the_reason(body: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_metadata(body.encode(), issuer="https://id.example", source="s")


BASE = ProviderConfig(name="p", issuer=URL("https://id.example"), client_id="id",
                      client_secret="s", upstream=URL("https://api.example"))
META = Metadata(issuer="https://id.example", authorization_endpoint=URL("https://id.example/a"),
                token_endpoint=URL("https://id.example/t"),
                revocation_endpoint=URL("https://id.example/r"),
                jwks_uri=URL("https://id.example/k"))


def test_metadata_fills_only_what_is_missing() -> None:
    mine = replace(BASE, token_url=URL("https://mine.example/t"), sources={"token_url": "config"})
    assert needs_discovery(mine)
    done = apply_metadata(mine, META)
    assert done.token_url == URL("https://mine.example/t")
    assert done.authorize_url == URL("https://id.example/a")
    assert done.sources == {"token_url": "config", "authorize_url": "discovery",
                            "revocation_url": "discovery", "jwks_url": "discovery"}
    assert done.usable and done.discovered and not needs_discovery(done)


@pytest.mark.parametrize(("methods", "configured", "pkce"), [
    (None, False, True),  # not advertised: keep PKCE (unknown parameters are ignored, §3.1)
    (("S256",), False, True),
    (("plain",), False, False),  # advertised without S256: the server would reject it
    ((), False, False),
    (("plain",), True, True),  # configured explicitly: the operator knows better
])
def test_pkce_follows_the_metadata_unless_configured(
        methods: tuple[str, ...] | None, configured: bool, pkce: bool) -> None:
    provider = replace(BASE, sources={"pkce": "config"} if configured else {})
    assert apply_metadata(provider, replace(META, code_challenge_methods_supported=methods)
                          ).pkce is pkce


def test_client_auth_moves_to_post_only_when_basic_is_not_offered() -> None:
    def auth(methods: tuple[str, ...] | None, sources: dict[str, str] | None = None) -> str:
        meta = replace(META, token_endpoint_auth_methods_supported=methods)
        return apply_metadata(replace(BASE, sources=sources or {}), meta).client_auth

    assert auth(("client_secret_post",)) == "client_secret_post"
    assert auth(("client_secret_basic", "client_secret_post")) == "client_secret_basic"
    assert auth(None) == "client_secret_basic"
    assert auth(("client_secret_post",), {"client_auth": "config"}) == "client_secret_basic"


def test_a_document_without_endpoints_leaves_the_provider_not_usable() -> None:
    done = apply_metadata(BASE, Metadata(issuer="https://id.example"))
    assert not done.usable
    assert set(done.problems) == {
        "no token_url (the discovery document has no token_endpoint)",
        "no authorize_url (the discovery document has no authorization_endpoint)"}
    assert with_problems(done).problems == done.problems  # survives a recomputation


# --------------------------------------------------------------------------- the fake server


async def test_discovery_from_the_fake_authorization_server(
        fake: FakeAuthServer, session: aiohttp.ClientSession) -> None:
    assert fake.url is not None
    meta = await discover(session, URL(fake.issuer_url()))
    assert meta.authorization_endpoint == fake.url / "authorize"
    assert meta.token_endpoint == fake.url / "token"
    assert meta.revocation_endpoint == fake.url / "revoke"
    assert meta.jwks_uri == fake.url / "jwks"
    assert meta.source.endswith("/.well-known/openid-configuration")
    assert fake.hits["discovery"] == 1  # OIDC answered: RFC 8414 not asked


async def test_a_config_with_only_an_issuer_resolves_and_gets_a_token(
        fake: FakeAuthServer, session: aiohttp.ClientSession,
        write_config: WriteConfig) -> None:
    cfg = write_config({"providers": {"f": oidc_entry(fake.issuer_url(),
                                                      grant="client_credentials")}})
    before = cfg.providers["f"]
    assert before.usable and before.token_url is None and needs_discovery(before)
    after = (await resolve_providers(session, cfg.providers))["f"]
    assert after.usable, after.problems
    assert after.token_url == URL(fake.issuer_url()) / "token"
    assert after.sources["token_url"] == "discovery"
    grant = await OAuthClient(session, timeout=5).client_credentials(after, now=time.time())
    assert isinstance(grant, TokenGrant), grant
    assert fake.is_valid_access_token(grant.tokens.access_token) is not None


async def test_explicit_endpoints_win_over_discovered_ones(
        fake: FakeAuthServer, session: aiohttp.ClientSession,
        write_config: WriteConfig) -> None:
    cfg = write_config({"providers": {"f": oidc_entry(
        fake.issuer_url(), token_url="https://elsewhere.example/token", pkce=False)}})
    after = (await resolve_providers(session, cfg.providers))["f"]
    assert after.token_url == URL("https://elsewhere.example/token")
    assert after.authorize_url == URL(fake.issuer_url()) / "authorize"
    assert after.pkce is False and after.usable


async def test_one_fetch_per_issuer_then_the_cache(
        fake: FakeAuthServer, session: aiohttp.ClientSession,
        write_config: WriteConfig) -> None:
    cfg = write_config({"providers": {"a": oidc_entry(fake.issuer_url()),
                                      "b": oidc_entry(fake.issuer_url(), scopes=["x"])}})
    first = await resolve_providers(session, cfg.providers)
    assert first["a"].usable and first["b"].usable and fake.hits["discovery"] == 1
    await resolve_providers(session, cfg.providers)
    assert fake.hits["discovery"] == 1
    discovery.clear_cache()
    await resolve_providers(session, cfg.providers)
    assert fake.hits["discovery"] == 2


async def test_providers_needing_nothing_are_not_fetched(
        fake: FakeAuthServer, session: aiohttp.ClientSession,
        write_config: WriteConfig) -> None:
    entry = fake.config_entry(issuer=fake.issuer_url(), jwks_url=str(fake.url / "jwks"),
                              upstream="https://api.example")
    cfg = write_config({"providers": {"full": entry, "plain": fake.config_entry(
        upstream="https://api.example")}})
    out = await resolve_providers(session, cfg.providers)
    assert out == dict(cfg.providers) and fake.hits["discovery"] == 0


async def test_check_fetches_uncached_and_names_the_provider(
        fake: FakeAuthServer, refused_port: int) -> None:
    provider = fake.provider_config("f")
    meta = await discovery.check(provider, timeout=5)
    assert meta.token_endpoint == provider.token_url
    await discovery.check(provider, timeout=5)
    assert fake.hits["discovery"] == 2
    down = replace(provider, issuer=URL(f"http://127.0.0.1:{refused_port}"))
    with pytest.raises(DiscoveryError) as info:
        await discovery.check(down, timeout=5)
    assert info.value.message.startswith("providers.f.issuer (http://127.0.0.1:")


# --------------------------------------------------------------------------- RFC 8414 and faults


async def test_rfc8414_fallback_inserts_the_well_known_path(
        docs: DocServer, session: aiohttp.ClientSession) -> None:
    issuer = f"{docs.base}/tenant"
    docs.document("/.well-known/oauth-authorization-server/tenant", docs.metadata(issuer))
    meta = await discover(session, URL(issuer))
    assert meta.token_endpoint == docs.base / "token"
    assert meta.source == f"{docs.base}/.well-known/oauth-authorization-server/tenant"
    assert docs.paths == ["/tenant/.well-known/openid-configuration",
                          "/.well-known/oauth-authorization-server/tenant"]


async def test_a_bad_oidc_document_falls_back_to_rfc8414(
        docs: DocServer, session: aiohttp.ClientSession) -> None:
    issuer = str(docs.base)
    docs.document("/.well-known/openid-configuration", docs.metadata("https://other.example"))
    docs.document("/.well-known/oauth-authorization-server", docs.metadata(issuer))
    meta = await discover(session, URL(issuer))
    assert meta.source.endswith("/.well-known/oauth-authorization-server")


async def test_an_issuer_mismatch_everywhere_is_refused(
        docs: DocServer, session: aiohttp.ClientSession,
        write_config: WriteConfig) -> None:
    issuer = str(docs.base)
    docs.document("/.well-known/oauth-authorization-server",
                  docs.metadata("https://impostor.example"))
    with pytest.raises(DiscoveryError) as info:
        await discover(session, URL(issuer), provider="m")
    assert info.value.message.startswith(f"providers.m.issuer ({issuer}): discovery failed")
    assert "HTTP 404" in info.value.reason and "'https://impostor.example'" in info.value.reason
    cfg = write_config({"providers": {"m": oidc_entry(issuer)}})
    out = (await resolve_providers(session, cfg.providers))["m"]
    assert not out.usable and "must be identical" in out.problems[0]


@pytest.mark.parametrize(("status", "body", "words"), [
    (500, '{"error": "boom"}', "answered HTTP 500"),
    (200, "<html><body>Welcome!</body></html>", "not JSON"),
    (200, "", "not JSON"),
    (200, json.dumps({"issuer": "x"}).encode() + b" " * (600 * 1024), "over 512 KiB"),
])
async def test_faulty_servers_leave_the_provider_not_usable_with_the_reason(
        docs: DocServer, session: aiohttp.ClientSession, write_config: WriteConfig,
        status: int, body: str | bytes, words: str) -> None:
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        docs.document(path, body, status)
    cfg = write_config({"providers": {"bad": oidc_entry(str(docs.base))}})
    out = await resolve_providers(session, cfg.providers)
    bad = out["bad"]
    assert not bad.usable and bad.token_url is None
    assert bad.problems[0].startswith(f"discovery from {docs.base} failed: ")
    assert words in bad.problems[0] and len(docs.paths) == 2  # both locations tried


async def test_an_unreachable_issuer_is_tried_once_and_does_not_stop_the_others(
        fake: FakeAuthServer, session: aiohttp.ClientSession, write_config: WriteConfig,
        refused_port: int, caplog: pytest.LogCaptureFixture) -> None:
    down = f"http://127.0.0.1:{refused_port}"
    cfg = write_config({"providers": {"down": oidc_entry(down),
                                      "up": oidc_entry(fake.issuer_url())}})
    out = await resolve_providers(session, cfg.providers)
    assert out["up"].usable
    assert not out["down"].usable
    reason = out["down"].problems[0]
    assert "could not be fetched" in reason and "oauth-authorization-server" not in reason
    assert "provider down is not usable" in caplog.text
    # A failure is not cached: once the issuer answers, the next resolution succeeds.
    assert (await resolve_providers(session, {"up": out["up"]}))["up"].usable


async def test_an_issuer_that_never_answers_times_out(
        docs: DocServer, session: aiohttp.ClientSession) -> None:
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=404)

    docs.routes["/.well-known/openid-configuration"] = stall
    try:
        with pytest.raises(DiscoveryError, match=r"gave no answer within 0\.2s"):
            await discover(session, docs.base, timeout=0.2, provider="slow")
    finally:
        release.set()
    assert docs.paths == ["/.well-known/openid-configuration"]  # same host: not tried twice


async def test_gateway_check_online_fetches_each_issuer(
        fake: FakeAuthServer, write_config: WriteConfig, tmp_path: Any, refused_port: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main as cli_main

    write_config({"providers": {"good": oidc_entry(fake.issuer_url())}})
    args = ["--config", str(tmp_path / "config.yaml"), "check", "--online"]
    assert await asyncio.to_thread(cli_main, args) == 0
    assert fake.hits["discovery"] == 1
    write_config({"providers": {"good": oidc_entry(fake.issuer_url()),
                                "down": oidc_entry(f"http://127.0.0.1:{refused_port}")}})
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, args) == 1
    assert "providers.down.issuer" in capsys.readouterr().err
