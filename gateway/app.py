"""Composition root: ``create_app(config)`` wires every part; ``run`` serves it.

Objects that need a running loop (the store connection, the pooled client session, the
token manager) are built in one ``cleanup_ctx`` and published as :data:`SERVICES`; route
handlers are thin functions that look them up, so the routing table is fixed at creation.

Providers live in a :class:`ProviderRegistry`: a mapping whose contents a reload (SIGHUP)
or the end of discovery replaces in one assignment. Every consumer reads a provider once per
request and keeps that object, so a request in flight finishes with the configuration it
started with while new requests see the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from aiohttp import web

from gateway.accesslog import REDACT, RequestObserver
from gateway.admin import AdminApi, AdminOps, check_admin_key
from gateway.audit import CONNECTION_REVOKED, AuditLog, retention_cutoff
from gateway.config import Config, ProviderConfig, load_config
from gateway.errors import ConfigError, ConsentRequired, GatewayError, Unauthenticated
from gateway.identities import IdentityService
from gateway.keyrotation import api_key_mac
from gateway.limits import InFlightLimiter, admit, release_slots
from gateway.metrics import Metrics
from gateway.middleware import error_middleware, error_response
from gateway.oauth.client import OAuthClient
from gateway.oauth.idtoken import IdTokenVerifier
from gateway.proxy.handler import ProxyHandler, make_client_session, refuse_connect
from gateway.ratelimit import RateLimit, RateLimiter
from gateway.store import create_store
from gateway.store.base import Identity, Store
from gateway.tokens.crypto import SecretBox, box_from_config, derive
from gateway.tokens.manager import TokenManager
from gateway.tokens.source import Lease, TokenSource
from gateway.web import pages
from gateway.web.consent import ConsentFlow
from gateway.web.console import Console
from gateway.web.sessions import SESSION_KEY, BrowserSessions, TrustedHeader

log = logging.getLogger("gateway")

IDENTITY: web.RequestKey[Identity] = web.RequestKey("gateway.identity")
HOUSEKEEPING_INTERVAL = 30.0
ADMIN_KEY_ENV = "GATEWAY_ADMIN_KEY"
DEFAULT_AUDIT_RETENTION_DAYS = 90.0


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class OpsSettings:
    """What the operations features need from the config (see :func:`ops_settings`); tests
    pass their own."""

    admin_key: str | None = None
    identity_labels: bool = False
    rate_limit: RateLimit | None = None
    audit_retention_days: float | None = DEFAULT_AUDIT_RETENTION_DAYS


def ops_settings(config: Config, env: Mapping[str, str] | None = None) -> OpsSettings:
    """The operations settings of ``config``; the admin key may instead come from
    ``$GATEWAY_ADMIN_KEY`` (the config's ``admin.key`` wins)."""
    env = os.environ if env is None else env
    configured = config.admin.key
    key = configured or env.get(ADMIN_KEY_ENV) or None
    limit = config.rate_limit
    rate = RateLimit(limit.requests_per_second, limit.burst) if limit is not None else None
    return OpsSettings(
        admin_key=check_admin_key(key, "admin.key" if configured else ADMIN_KEY_ENV),
        identity_labels=config.metrics.identity_labels, rate_limit=rate,
        audit_retention_days=config.audit_retention_days or None)


# --------------------------------------------------------------------------- providers


class ProviderRegistry(Mapping[str, ProviderConfig]):
    """The providers in force; ``current`` is replaced whole, never changed in place."""

    def __init__(self, providers: Mapping[str, ProviderConfig]) -> None:
        self.current: Mapping[str, ProviderConfig] = MappingProxyType(dict(providers))
        self.generation = 0
        self.discovering = False

    def __getitem__(self, name: str) -> ProviderConfig:
        return self.current[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.current)

    def __len__(self) -> int:
        return len(self.current)

    def replace(self, providers: Mapping[str, ProviderConfig]) -> int:
        self.current = MappingProxyType(dict(providers))
        self.generation += 1
        return self.generation


def _pending_discovery(providers: Mapping[str, ProviderConfig]) -> dict[str, ProviderConfig]:
    """Providers whose endpoints come from discovery, marked unusable until it has run."""
    from gateway.oauth.discovery import needs_discovery

    return {name: replace(p, problems=(*p.problems, f"discovery from {p.issuer} is running"))
            if needs_discovery(p) else p for name, p in providers.items()}


async def _resolve(http: Any, providers: Mapping[str, ProviderConfig], seconds: float,
                   fresh: bool) -> dict[str, ProviderConfig]:
    """Discovery for the providers that need it (each fetch bounded by ``seconds``)."""
    from gateway.oauth.discovery import resolve_providers

    return await resolve_providers(http, providers, timeout=seconds,
                                   cache={} if fresh else None)


def _config_secrets(config: Config, ops: OpsSettings) -> list[str | None]:
    return [*(p.client_secret for p in config.providers.values()), config.encryption_key,
            *config.encryption_keys_old, ops.admin_key]


# --------------------------------------------------------------------------- services


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
    providers: ProviderRegistry
    audit: AuditLog
    admin: AdminOps
    limiter: RateLimiter | None
    http: Any = None
    draining: bool = False
    inflight: InFlightLimiter | None = None  # server.max_concurrent_per_identity


CONFIG = web.AppKey("config", Config)
BOX = web.AppKey("box", SecretBox)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
SERVICES = web.AppKey("services", Services)
OPS = web.AppKey("ops", OpsSettings)
METRICS = web.AppKey("metrics", Metrics)
REGISTRY = web.AppKey("registry", ProviderRegistry)
OBSERVER = web.AppKey("observer", RequestObserver)


def bearer(request: web.Request) -> str | None:
    """The gateway key from ``Authorization`` or ``Proxy-Authorization`` (RFC 6750 §2.1)."""
    for header in ("Authorization", "Proxy-Authorization"):
        value = request.headers.get(header, "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


async def authenticate(request: web.Request) -> Identity:
    """The identity of the gateway key, within its rate limit and its number of requests
    in flight (429 otherwise; the slot is given back by ``release_slots``)."""
    key = bearer(request)
    if key is None:
        raise Unauthenticated("Send your gateway key as 'Authorization: Bearer <key>'.")
    services = request.app[SERVICES]
    identity = await services.identities.authenticate_key(key)
    if identity is None:
        raise Unauthenticated("The gateway key is not valid (unknown or revoked).")
    REDACT.register(key)
    request[IDENTITY] = identity
    try:
        if services.limiter is not None:
            services.limiter.check(identity.id)
        admit(request, services.inflight, identity.id)
    except GatewayError:
        request.app[METRICS].limited(identity.name)
        raise
    return identity


def identity_name(request: web.Request) -> str | None:
    """Who made the request: its gateway key's identity, else its browser session's."""
    identity = request.get(IDENTITY)
    if identity is not None:
        return identity.name
    current = request.get(SESSION_KEY)
    return current.identity.name if current is not None else None


class _RedactingTokens:
    """The token source, telling the log redactor about every access token it hands out."""

    def __init__(self, inner: TokenSource) -> None:
        self._inner = inner

    async def lease(self, identity: Identity, provider: str) -> Lease:
        lease = await self._inner.lease(identity, provider)
        REDACT.register(lease.access_token)
        return lease

    async def rejected(self, identity: Identity, provider: str, lease: Lease) -> Lease | None:
        new = await self._inner.rejected(identity, provider, lease)
        if new is not None:
            REDACT.register(new.access_token)
        return new


def _both(*hooks: Callable[..., None]) -> Callable[..., None]:
    def call(*args: Any) -> None:
        for hook in hooks:
            try:
                hook(*args)
            except Exception:  # metrics and audit must never break the flow they watch
                log.exception("event hook failed")

    return call


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
    registry, metrics, ops, observer = app[REGISTRY], app[METRICS], app[OPS], app[OBSERVER]
    store = create_store(config.store, box)
    await store.open()
    http = make_client_session(config.server)
    oauth = OAuthClient(http, timeout=config.server.token_timeout)
    audit = AuditLog(store, clock)
    tokens = TokenManager(store, oauth, registry, skew=config.server.refresh_skew, clock=clock,
                          on_event=_both(metrics.token_event, audit.token_event),
                          on_cache=metrics.cache_lookup)
    identities = IdentityService(store, box, clock, mac_key=await api_key_mac(store, box))
    sessions = BrowserSessions(store, secure=config.server.public_url.scheme == "https",
                               clock=clock, trusted=TrustedHeader.from_config(config))
    consent = ConsentFlow(
        config, store, oauth, sessions,
        # Pinned in the store like the key-hash secret: links and flow cookies stay valid
        # across an encryption-key rotation and between instances mid-rollout.
        link_key=await store.server_secret("connect-link", derive(box.root_key, "connect-link")),
        flow_key=await store.server_secret("flow-cookie", derive(box.root_key, "flow-cookie")),
        providers=lambda: registry,
        on_connected=lambda identity_id, name: tokens.invalidate(identity_id, name),
        verify_id_token=_id_token_verifier(IdTokenVerifier(http), clock),
        on_event=_both(metrics.consent_event, audit.consent_event), clock=clock)

    def disconnected(identity_id: int, name: str) -> None:
        tokens.invalidate(identity_id, name)
        audit.record(CONNECTION_REVOKED, "ok", identity_id=identity_id, provider=name,
                     detail="disconnected from the dashboard")

    console = Console(config, store, identities, sessions, oauth, lambda: registry,
                      on_disconnected=disconnected, clock=clock)
    proxy = ProxyHandler(registry, config.server, http, _RedactingTokens(tokens), authenticate,
                         request_id=observer.request_id, on_upstream=observer.upstream_answered)
    admin = AdminOps(store, identities, audit, oauth, lambda: registry,
                     on_revoked=lambda identity_id, name: tokens.invalidate(identity_id, name))
    limiter = RateLimiter(ops.rate_limit) if ops.rate_limit is not None else None
    per_identity = config.server.max_concurrent_per_identity
    app[SERVICES] = Services(config, store, box, oauth, tokens, identities, sessions, consent,
                             console, proxy, registry, audit, admin, limiter, http,
                             inflight=InFlightLimiter(per_identity) if per_identity else None)
    for p in config.providers.values():  # (discovery reports its own failures)
        if not p.usable:
            log.warning("provider %s is not usable: %s", p.name, "; ".join(p.problems))
    tasks = [asyncio.create_task(_housekeeping(app)), asyncio.create_task(audit.run())]
    if registry.discovering:
        tasks.append(asyncio.create_task(_discover(app)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await identities.flush_last_used()
        await tokens.close(config.server.shutdown_grace)
        with contextlib.suppress(Exception):
            await audit.flush()
        await http.close()
        await store.close()


async def _discover(app: web.Application) -> None:
    """Fill endpoints from the issuers' metadata, then swap them in (unless a reload did)."""
    registry, s = app[REGISTRY], app[SERVICES]
    generation = registry.generation
    try:
        resolved = await _resolve(s.http, app[CONFIG].providers, app[CONFIG].server.token_timeout,
                                  fresh=False)
        if registry.generation == generation:
            registry.replace(resolved)
    except Exception:
        log.exception("provider discovery failed")
    finally:
        registry.discovering = False


_Verify = Callable[[ProviderConfig, str, str | None], Awaitable[Mapping[str, Any]] | None]


def _id_token_verifier(verifier: IdTokenVerifier, clock: Callable[[], float]) -> _Verify:
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
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        try:
            await housekeep(app)
        except Exception:
            log.exception("housekeeping failed")


async def housekeep(app: web.Application) -> None:
    """One round: batched key use times, expired flows and sessions, old audit rows."""
    s, now = app[SERVICES], app[CLOCK]()
    await s.identities.flush_last_used()
    await s.store.purge_expired(now, audit_before=retention_cutoff(
        now, app[OPS].audit_retention_days))


# --------------------------------------------------------------------------- reload


_RELOAD_LOCK = web.AppKey("reload_lock", asyncio.Lock)


async def reload_config(app: web.Application) -> bool:
    """SIGHUP: re-read the config file and swap in its providers. An invalid file is refused
    with one log line and the running configuration stays. Other sections need a restart."""
    config, registry, metrics = app[CONFIG], app[REGISTRY], app[METRICS]
    async with app[_RELOAD_LOCK]:
        try:
            new = load_config(config.source)
        except (ConfigError, OSError) as e:
            text = e.message if isinstance(e, ConfigError) else str(e)
            log.error("config reload refused: %s: %s; keeping the running configuration",
                      config.source, text)
            metrics.reloaded(False)
            return False
        services = app.get(SERVICES)
        http = services.http if services is not None else None
        providers = (await _resolve(http, new.providers, new.server.token_timeout, fresh=True)
                     if http is not None else dict(new.providers))
        old = registry.current
        registry.replace(providers)
        registry.discovering = False
        REDACT.set_static("config", _config_secrets(new, app[OPS]))
        added = sorted(set(providers) - set(old))
        removed = sorted(set(old) - set(providers))
        changed = sorted(n for n in set(providers) & set(old) if providers[n] != old[n])
        log.info("config reloaded from %s: %d providers (added: %s; removed: %s; changed: %s)",
                 config.source, len(providers), ", ".join(added) or "-",
                 ", ".join(removed) or "-", ", ".join(changed) or "-")
        # (host, port and public URL may have been overridden on the command line)
        stale = [f for f in ("store", "consent", "encryption_key", "encryption_key_file",
                             "log_format", "admin", "metrics", "rate_limit",
                             "audit_retention_days")
                 if getattr(new, f, None) != getattr(config, f, None)]
        if replace(new.server, host=config.server.host, port=config.server.port,
                   public_url=config.server.public_url) != config.server:
            stale.insert(0, "server")
        if stale:
            log.warning("config reload: changes to %s take effect at the next restart",
                        ", ".join(stale))
        metrics.reloaded(True)
        return True


# --------------------------------------------------------------------------- routes


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: config loaded, store reachable, discovery finished, not draining."""
    s = request.app.get(SERVICES)
    registry = request.app[REGISTRY]
    checks: dict[str, str] = {"config": "loaded" if s is not None else "loading"}
    ready = s is not None
    if s is not None:
        try:
            await s.store.ping()
            checks["store"] = "ok"
        except Exception:
            checks["store"] = "unreachable"
            ready = False
        if s.draining:
            checks["server"] = "draining"
            ready = False
    checks["providers"] = "discovering" if registry.discovering else "ok"
    ready = ready and not registry.discovering
    unusable = {n: "; ".join(p.problems) for n, p in registry.items() if not p.usable}
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": checks,
                            "unusable_providers": unusable}
    if ready:
        return web.json_response(body, headers={"Cache-Control": "no-store"})
    return web.json_response({"error": "not_ready", **body}, status=503, headers={
        "Gateway-Error": "not_ready", "Cache-Control": "no-store"})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type,
                                            "Cache-Control": "no-store"})


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
               box: SecretBox | None = None, ops: OpsSettings | None = None) -> web.Application:
    """The only composition root. Raises ConfigError (before serving) for a bad key.

    ``ops`` defaults to :func:`ops_settings` of ``config`` and the environment."""
    ops = ops if ops is not None else ops_settings(config)
    registry = ProviderRegistry(config.providers)
    pending = _pending_discovery(config.providers)
    if pending != dict(config.providers):
        registry.replace(pending)
        registry.discovering = True
    metrics_ = Metrics(identity_labels=ops.identity_labels, providers=lambda: registry)
    observer = RequestObserver(metrics_, lambda: registry, identity_name)
    app = web.Application(middlewares=[observer.middleware, error_middleware, release_slots,
                                       refuse_connect, connect_link_middleware],
                          client_max_size=1024 * 1024)
    app[CONFIG] = config
    app[BOX] = box or box_from_config(config.encryption_key, config.encryption_key_file,
                                      config.encryption_keys_old)
    app[CLOCK] = clock
    app[OPS] = ops
    app[METRICS] = metrics_
    app[REGISTRY] = registry
    app[OBSERVER] = observer
    app[_RELOAD_LOCK] = asyncio.Lock()
    REDACT.set_static("config", _config_secrets(config, ops))
    app.cleanup_ctx.append(_services)
    app.on_response_prepare.append(observer.on_response_prepare)
    pages.setup(app)
    r = app.router
    r.add_get("/_gateway/healthz", healthz)
    r.add_get("/_gateway/readyz", readyz)
    r.add_get("/_gateway/metrics", metrics)
    r.add_get("/_gateway/callback", callback)
    r.add_get("/_gateway/connect/{provider}", connect_get)
    r.add_post("/_gateway/connect/{provider}", connect_post)
    r.add_post("/_gateway/api/connect/{provider}", api_connect)
    AdminApi(lambda request: request.app[SERVICES].admin, ops.admin_key, clock).add_routes(r)
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


def run(config: Config, *, workers: int = 1, pidfile: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT (see gateway.serving)."""
    from gateway.serving import run as _run

    _run(config, workers=workers, pidfile=pidfile)
