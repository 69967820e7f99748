"""Composition root: ``create_app(config)`` wires every part; ``run`` serves it.

Objects that need a running loop (the store connection, the pooled client session, the
token manager) are built in one ``cleanup_ctx`` and published as :data:`SERVICES`; route
handlers are thin functions that look them up, so the routing table is fixed at creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from dataclasses import dataclass

from aiohttp import web

from gateway.config import Config, ProviderConfig
from gateway.errors import ConsentRequired, GatewayError, Unauthenticated
from gateway.identities import IdentityService
from gateway.middleware import error_middleware, error_response
from gateway.oauth.client import OAuthClient
from gateway.oauth.idtoken import IdTokenVerifier
from gateway.proxy.handler import ProxyHandler, make_client_session, refuse_connect
from gateway.store import create_store
from gateway.store.base import Identity, Store
from gateway.tokens.crypto import SecretBox, box_from_config, derive
from gateway.tokens.manager import TokenManager
from gateway.web import pages
from gateway.web.console import Console
from gateway.web.consent import ConsentFlow
from gateway.web.sessions import BrowserSessions

log = logging.getLogger("gateway")

IDENTITY: web.RequestKey[Identity] = web.RequestKey("gateway.identity")
HOUSEKEEPING_INTERVAL = 30.0


@dataclass(slots=True)
class Services:
    config: Config
    store: Store
    box: SecretBox
    oauth: OAuthClient
    tokens: TokenManager
    identities: IdentityService
    sessions: BrowserSessions
    consent: ConsentFlow
    console: Console
    proxy: ProxyHandler
    providers: Mapping[str, ProviderConfig]


CONFIG = web.AppKey("config", Config)
BOX = web.AppKey("box", SecretBox)
CLOCK = web.AppKey("clock", Callable[[], float])
SERVICES = web.AppKey("services", Services)


def bearer(request: web.Request) -> str | None:
    """The gateway key from ``Authorization`` or ``Proxy-Authorization`` (RFC 6750 §2.1)."""
    for header in ("Authorization", "Proxy-Authorization"):
        value = request.headers.get(header, "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


async def authenticate(request: web.Request) -> Identity:
    key = bearer(request)
    if key is None:
        raise Unauthenticated("Send your gateway key as 'Authorization: Bearer <key>'.")
    identity = await request.app[SERVICES].identities.authenticate_key(key)
    if identity is None:
        raise Unauthenticated("The gateway key is not valid (unknown or revoked).")
    request[IDENTITY] = identity
    return identity


@web.middleware
async def connect_link_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:  # type: ignore[type-arg]
    """Give every consent_required answer a fresh connect link for the caller's identity."""
    try:
        return await handler(request)
    except ConsentRequired as err:
        identity = request.get(IDENTITY)
        if identity is not None and err.extra.get("connect_url") is None:
            offer = request.app[SERVICES].consent.offer(identity, err.extra["provider"])
            err.extra["connect_url"] = offer.url
            err.extra["connect_url_expires_at"] = int(offer.expires_at)
        raise


async def _services(app: web.Application) -> AsyncIterator[None]:
    config, box, clock = app[CONFIG], app[BOX], app[CLOCK]
    providers = config.providers
    store = create_store(config.store, box)
    await store.open()
    http = make_client_session(config.server)
    oauth = OAuthClient(http, timeout=config.server.token_timeout)
    tokens = TokenManager(store, oauth, providers, skew=config.server.refresh_skew, clock=clock)
    identities = IdentityService(store, box, clock)
    sessions = BrowserSessions(store, secure=config.server.public_url.scheme == "https", clock=clock)
    consent = ConsentFlow(
        config, store, oauth, sessions,
        link_key=derive(box.root_key, "connect-link"), flow_key=derive(box.root_key, "flow-cookie"),
        providers=lambda: providers,
        on_connected=lambda identity_id, name: tokens.invalidate(identity_id, name),
        verify_id_token=_id_token_verifier(IdTokenVerifier(http), clock), clock=clock)
    console = Console(config, store, identities, sessions, oauth, lambda: providers,
                      on_disconnected=lambda identity_id, name: tokens.invalidate(identity_id, name),
                      clock=clock)
    proxy = ProxyHandler(providers, config.server, http, tokens, authenticate)
    app[SERVICES] = Services(config, store, box, oauth, tokens, identities, sessions, consent,
                             console, proxy, providers)
    for p in providers.values():
        if not p.usable:
            log.warning("provider %s is not usable: %s", p.name, "; ".join(p.problems))
    housekeeping = asyncio.create_task(_housekeeping(app))
    try:
        yield
    finally:
        housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await housekeeping
        with contextlib.suppress(Exception):
            await identities.flush_last_used()
        await tokens.close(config.server.shutdown_grace)
        await http.close()
        await store.close()


def _id_token_verifier(verifier: IdTokenVerifier, clock: Callable[[], float]
                       ) -> Callable[[ProviderConfig, str, str | None], Awaitable[Mapping[str, Any]] | None]:
    """OIDC Core §3.1.3.7, for providers whose issuer and JWKS we know; others: no sub."""

    async def verify(provider: ProviderConfig, id_token: str, nonce: str | None
                     ) -> Mapping[str, Any] | None:
        if provider.issuer is None or provider.jwks_url is None:
            return None
        return await verifier.verify(id_token, jwks_url=str(provider.jwks_url),
                                     issuer=str(provider.issuer),
                                     client_id=provider.client_id, nonce=nonce, now=clock())

    return verify  # type: ignore[return-value]


async def _housekeeping(app: web.Application) -> None:
    s = app[SERVICES]
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        try:
            await s.identities.flush_last_used()
            await s.store.purge_expired(app[CLOCK]())
        except Exception:
            log.exception("housekeeping failed")


# --------------------------------------------------------------------------- routes


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[SERVICES].store.ping()
    except Exception:
        return error_response(_NotReady("The store is not reachable."))
    return web.json_response({"status": "ready"})


class _NotReady(GatewayError):
    status, code = 503, "not_ready"


async def api_connect(request: web.Request) -> web.StreamResponse:
    identity = await authenticate(request)
    return await request.app[SERVICES].consent.api_connect(request, identity)


async def connect_get(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].consent.connect_page(request)


async def connect_post(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].consent.connect_post(request)


async def callback(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].consent.callback(request)


async def login_get(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].console.login_page(request)


async def login_post(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].console.login_post(request)


async def logout(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].console.logout(request)


async def dashboard(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].console.dashboard(request)


async def disconnect(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].console.disconnect(request)


async def key_create(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].console.key_create(request)


async def key_revoke(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].console.key_revoke(request)


async def proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].proxy.handle(request)


async def gateway_not_found(request: web.Request) -> web.StreamResponse:
    return error_response(_NotFound(f"No gateway page at {request.path}."))


class _NotFound(GatewayError):
    status, code = 404, "not_found"


def create_app(config: Config, *, clock: Callable[[], float] = time.time,
               box: SecretBox | None = None) -> web.Application:
    """The only composition root. Raises ConfigError (before serving) for a bad key."""
    app = web.Application(middlewares=[error_middleware, refuse_connect, connect_link_middleware],
                          client_max_size=1024 * 1024)
    app[CONFIG] = config
    app[BOX] = box or box_from_config(config.encryption_key, config.encryption_key_file,
                                      config.encryption_keys_old)
    app[CLOCK] = clock
    app.cleanup_ctx.append(_services)
    pages.setup(app)
    r = app.router
    r.add_get("/_gateway/healthz", healthz)
    r.add_get("/_gateway/readyz", readyz)
    r.add_get("/_gateway/callback", callback)
    r.add_get("/_gateway/connect/{provider}", connect_get)
    r.add_post("/_gateway/connect/{provider}", connect_post)
    r.add_post("/_gateway/api/connect/{provider}", api_connect)
    r.add_get("/_gateway/login", login_get)
    r.add_post("/_gateway/login", login_post)
    r.add_route("*", "/_gateway/logout", logout)
    r.add_get("/_gateway/", dashboard)
    r.add_post("/_gateway/disconnect/{provider}", disconnect)
    r.add_post("/_gateway/keys", key_create)
    r.add_post("/_gateway/keys/revoke", key_revoke)
    r.add_route("*", "/_gateway/{tail:.*}", gateway_not_found)
    r.add_route("*", r"/{tail:[\s\S]*}", proxy)
    return app


def run(config: Config, *, workers: int = 1) -> None:
    """Serve until SIGTERM/SIGINT (see gateway.serving)."""
    from gateway.serving import run as _run

    _run(config, workers=workers)
