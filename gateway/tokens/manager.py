"""The token manager: a usable access token per (identity, provider), refreshed exactly once.

Theory of operation
-------------------
``lease`` is the proxy's hot path. A per-process cache maps ``(identity_id, provider)`` to the
decrypted, *active* :class:`~gateway.store.base.Connection`; a hit whose token
:func:`~gateway.tokens.lifecycle.assess` calls ``Fresh`` returns without touching the store.
Missing rows and rows awaiting re-consent are never cached, so a consent completed in another
worker is seen on the next request.

A ``RefreshDue`` or ``Expired`` token goes through a *flight*: one asyncio task per key in this
process, which every concurrent caller awaits through :func:`asyncio.shield` (a caller that
disconnects does not abort the refresh for the others; the flight's result or failure
reaches every waiter). Inside the flight:

1. take ``store.refresh_lock`` — exclusive across processes and hosts sharing the store;
2. re-read the connection: if its version moved, or the token is now fresh, use it without
   calling the token endpoint (double-checked; SPEC invariant 5);
3. call the token endpoint, then ``store.update_tokens`` (compare-and-set on the version)
   *before* the new access token is used or the waiters wake (invariant 6);
4. on ``invalid_grant`` re-read once more: only if the version is still the one we refreshed
   with is the connection marked ``reconsent_required`` (the row and its tokens are kept).

Invariants kept here: at most one token-endpoint call per key at a time across everything
sharing the store; stored tokens are only ever replaced by a successful refresh, never
deleted or blanked by a failure; a transient failure keeps serving an access token that has
not really expired and otherwise answers 503 with Retry-After; tokens never reach a log line
or an error message.

A refresh whose answer cannot be stored (the store is locked, full or read-only) is not
thrown away: the provider may already have rotated the refresh token, so the merged tokens
are *parked* in memory, unused, and the next flight for that key stores them first (if the
row is still at the version they were refreshed from) instead of spending the old refresh
token. Meanwhile a still-valid access token keeps being served; otherwise the caller gets
503 ``store_unavailable``. Only a process that dies while holding a parked grant loses it.

Choices: a connection without a refresh token is used until it expires, then answers
``reconsent_required`` (it is not marked in the store: nothing was refused). Providers whose
``grant`` is ``client_credentials`` need no consent: a token is fetched (and fetched again
when due) with the same flight rules and stored under the gateway's own identity
(:data:`GATEWAY_IDENTITY`), one token shared by every identity the provider's ``identities``
allows (all when unset; others get 403 ``provider_forbidden``). The refresh
request omits ``scope`` (RFC 6749 §6: omitted means "as originally granted"). A cached token
that another process revoked is used until the upstream answers 401; ``rejected`` then
re-reads the store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from yarl import URL

from gateway.config import ProviderConfig
from gateway.errors import (
    BadRequest,
    ConsentRequired,
    ProviderForbidden,
    ReconsentRequired,
    StoreUnavailable,
    TokenEndpointUnavailable,
    UnknownProvider,
)
from gateway.oauth.client import OAuthClient
from gateway.oauth.protocol import OAuthError, TokenGrant
from gateway.store.base import Connection, Identity, Store, TokenFields
from gateway.tokens.lifecycle import (
    DEFAULT_RETRY_AFTER,
    Assessment,
    Expired,
    Fresh,
    Reconsent,
    RefreshDue,
    UseCurrent,
    assess,
    decide_after_refresh_failure,
    merge_refresh,
)
from gateway.tokens.source import Lease

log = logging.getLogger("gateway.tokens")

EventHook = Callable[[str, str, str, str], None]
CacheHook = Callable[[str, bool], None]  # (provider, hit) per lease()
GATEWAY_IDENTITY = "_gateway"
"""Owner of client_credentials tokens: reserved, since identity names start with a letter or
digit (gateway.identities.NAME_PATTERN), so no user identity can hold or shadow it."""
EVENT_REFRESHED = "connection.refreshed"
"""``on_event`` kind; outcome is ``ok``, ``failed`` or ``reconsent_required``."""

_Key = tuple[int, str]
# ok: conn is usable (new, or found fresh); stale_ok: refresh failed transiently, conn still
# valid; unavailable: transient, nothing usable; broken: non-transient non-grant error.
_Kind = Literal["ok", "stale_ok", "consent", "reconsent", "unavailable", "broken"]


@dataclass(frozen=True, slots=True)
class _Result:
    """What a flight settled on; each waiter turns it into its own Lease or exception."""

    kind: _Kind
    conn: Connection | None = None
    retry_after: float = DEFAULT_RETRY_AFTER


@dataclass(frozen=True, slots=True)
class _Cached:
    conn: Connection
    lease: Lease


@dataclass(frozen=True, slots=True)
class _Parked:
    """Refreshed tokens the store refused: to be stored over ``version`` before anything."""

    version: int
    tokens: TokenFields


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[_Result]
    force: bool
    seen_version: int | None
    waiters: int = field(default=0)


def _issued_at(conn: Connection) -> float | None:
    """When we stored these tokens: the lifetime the provider gave us starts there."""
    times = [t for t in (conn.refreshed_at, conn.updated_at) if t]
    return max(times) if times else None


def _upstream(extra: Mapping[str, str], member: str | None) -> URL | None:
    """A per-connection API base chosen by the token response, only for a provider whose
    ``upstream_from_token`` names that member (Salesforce: ``instance_url``), and only an
    absolute https URL without credentials. Any other provider's token response cannot move
    its traffic (SPEC invariant 2; RFC 9700 §4.9.1: the token endpoint's answer is no
    licence to send the access token elsewhere)."""
    raw = extra.get(member) if member else None
    if not raw:
        return None
    try:
        url = URL(raw)
    except (TypeError, ValueError):
        return None
    if url.scheme != "https" or not url.host or url.user is not None:
        return None
    return url.with_query(None).with_fragment(None)


def _to_lease(conn: Connection, cfg: ProviderConfig | None) -> Lease:
    t = conn.tokens
    member = cfg.upstream_from_token if cfg is not None else None
    return Lease(access_token=t.access_token, token_type=t.token_type or "Bearer",
                 version=conn.version, upstream=_upstream(t.extra, member))


class TokenManager:
    """Implements :class:`~gateway.tokens.source.TokenSource` over a Store and an OAuthClient."""

    def __init__(self, store: Store, oauth: OAuthClient, providers: Mapping[str, ProviderConfig],
                 *, skew: float = 60.0, clock: Callable[[], float] = time.time,
                 lock_timeout: float = 30.0, on_event: EventHook | None = None,
                 on_cache: CacheHook | None = None) -> None:
        if math.isnan(skew) or skew < 0:
            raise ValueError("skew must be a non-negative number of seconds")
        self._store = store
        self._oauth = oauth
        self._providers = providers
        self._skew = skew
        self._clock = clock
        self._lock_timeout = lock_timeout
        self._on_event = on_event
        self._on_cache = on_cache
        self._cache: dict[_Key, _Cached] = {}
        self._flights: dict[_Key, _Flight] = {}
        self._retry_at: dict[_Key, float] = {}  # no proactive refresh before (after a failure)
        self._parked: dict[_Key, _Parked] = {}  # refreshed tokens the store refused
        self._epoch = 0  # bumped by invalidate(): reads begun before it must not be cached
        self._owner: Identity | None = None  # GATEWAY_IDENTITY, once looked up

    # ------------------------------------------------------------------ TokenSource

    async def lease(self, identity: Identity, provider: str) -> Lease:
        """A token to send now; raises ConsentRequired, ReconsentRequired or
        TokenEndpointUnavailable (and UnknownProvider for a name not configured)."""
        cfg = self._provider(provider)
        if cfg.grant == "client_credentials":
            identity = await self._gateway_owner(identity, cfg)
        key = (identity.id, provider)
        cached = self._cache.get(key)
        if self._on_cache is not None:
            self._on_cache(provider, cached is not None)
        conn = cached.conn if cached is not None else await self._read(key)
        cc = cfg.grant == "client_credentials"
        if conn is not None and conn.status == "active":
            now = self._clock()
            state = self._assess(conn, now)
            if isinstance(state, Fresh):
                return self._lease_of(key, conn)
            if isinstance(state, RefreshDue) and (
                    now < self._retry_at.get(key, -math.inf)
                    or (not cc and not conn.tokens.refresh_token)):
                return self._lease_of(key, conn)  # backing off, or nothing to refresh with
            if isinstance(state, Expired) and not cc and not conn.tokens.refresh_token:
                if cached is not None:  # another worker may have reconnected: read again
                    self._cache.pop(key, None)
                    return await self.lease(identity, provider)
                raise self._reconsent(provider)
        elif not cc:
            if conn is None:
                raise ConsentRequired(f"no connection to provider {provider} yet; "
                                      "authorize it first", provider=provider)
            raise self._reconsent(provider)
        flight = self._flight(identity, cfg, None if conn is None else conn.version, False)
        result = await self._await(flight, provider)
        if result.kind in ("ok", "stale_ok") and result.conn is not None:
            return self._lease_of(key, result.conn)
        raise self._error(result, provider)

    async def rejected(self, identity: Identity, provider: str, lease: Lease) -> Lease | None:
        """The upstream answered 401 to ``lease``: return a newer token (one already stored,
        or from a forced single-flight refresh), or None when none can be had. Raises
        TokenEndpointUnavailable when the token endpoint is failing transiently, and
        Consent/ReconsentRequired when the connection is gone or its refresh token was
        rejected (the connection is then marked reconsent_required)."""
        cfg = self._provider(provider)
        if cfg.grant == "client_credentials":
            identity = await self._gateway_owner(identity, cfg)
        key = (identity.id, provider)
        cached = self._cache.get(key)
        if cached is not None and cached.conn.version != lease.version \
                and not isinstance(self._assess(cached.conn, self._clock()), Expired):
            return cached.lease
        for _ in range(2):  # a running proactive flight first, then our own forced one
            flight = self._flight(identity, cfg, lease.version, True)
            result = await self._await(flight, provider)
            if result.kind in ("ok", "stale_ok") and result.conn is not None \
                    and result.conn.version != lease.version:
                return self._lease_of(key, result.conn)
            if result.kind == "ok":  # that flight did not refresh *our* version: force one
                if flight.force and flight.seen_version == lease.version:
                    return None
                continue
            if result.kind in ("stale_ok", "unavailable", "consent", "reconsent"):
                # A rejected refresh token (or a connection removed meanwhile) is news the
                # client can act on: reconsent_required with a link beats the upstream's 401.
                raise self._error(result, provider)
            return None  # broken (e.g. invalid_client): the upstream's 401 goes to the client
        return None

    # ------------------------------------------------------------------ app hooks

    def invalidate(self, identity_id: int, provider: str | None = None) -> None:
        """Forget cached tokens (after consent, revoke, or identity removal)."""
        self._epoch += 1
        for key in [k for k in self._cache if k[0] == identity_id
                    and (provider is None or k[1] == provider)]:
            self._cache.pop(key, None)
        for key in [k for k in self._retry_at if k[0] == identity_id
                    and (provider is None or k[1] == provider)]:
            self._retry_at.pop(key, None)
        for key in [k for k in self._parked if k[0] == identity_id
                    and (provider is None or k[1] == provider)]:
            self._parked.pop(key, None)

    async def close(self, grace: float = 30.0) -> None:
        """Let running refreshes finish (cancelling one could lose a rotated refresh token),
        then cancel whatever is left after ``grace`` seconds."""
        tasks = [f.task for f in self._flights.values()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # ------------------------------------------------------------------ flights

    def _flight(self, identity: Identity, cfg: ProviderConfig, seen_version: int | None,
                force: bool) -> _Flight:
        key = (identity.id, cfg.name)
        flight = self._flights.get(key)
        if flight is None:
            task = asyncio.create_task(self._refresh(identity, cfg, seen_version, force),
                                       name=f"refresh {identity.id}/{cfg.name}")
            flight = self._flights[key] = _Flight(task, force, seen_version)
            task.add_done_callback(lambda t: self._landed(key, t))
        return flight

    def _landed(self, key: _Key, task: asyncio.Task[_Result]) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight.task is task:
            del self._flights[key]
        if not task.cancelled() and task.exception() is not None and flight \
                and flight.waiters == 0:
            log.error("token refresh for provider %s failed with no one waiting: %s",
                      key[1], type(task.exception()).__name__)

    async def _await(self, flight: _Flight, provider: str) -> _Result:
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if flight.task.cancelled() and task is not None and not task.cancelling():
                # The refresh itself was cancelled (shutdown), not this caller.
                raise TokenEndpointUnavailable(
                    f"token refresh for provider {provider} was interrupted") from None
            raise
        finally:
            flight.waiters -= 1

    async def _refresh(self, identity: Identity, cfg: ProviderConfig,
                       seen_version: int | None, force: bool) -> _Result:
        """The body of a flight; see the module docstring, steps 1-4."""
        key = (identity.id, cfg.name)
        async with self._store.refresh_lock(identity.id, cfg.name, self._lock_timeout) as got:
            conn = await self._read(key)
            if got and key in self._parked:
                conn = await self._store_parked(identity, cfg, conn)
            settled = self._settled(cfg, conn, seen_version, force)
            if settled is not None:
                return settled
            if not got:
                log.warning("refresh lock for provider %s not acquired within %.0f s",
                            cfg.name, self._lock_timeout)
                return self._after_transient(key, conn, DEFAULT_RETRY_AFTER)
            now = self._clock()
            if cfg.grant == "client_credentials":
                answer = await self._oauth.client_credentials(cfg, now=now)
            else:
                assert conn is not None and conn.tokens.refresh_token  # by _settled
                answer = await self._oauth.refresh(cfg, conn.tokens.refresh_token, scopes=(),
                                                   now=now)
            if isinstance(answer, OAuthError):
                return await self._failed(identity, cfg, conn, answer)
            return await self._stored(identity, cfg, conn, answer)

    def _settled(self, cfg: ProviderConfig, conn: Connection | None, seen_version: int | None,
                 force: bool) -> _Result | None:
        """The re-check after taking the lock: a result when no token request is needed."""
        cc = cfg.grant == "client_credentials"
        if conn is None or conn.status != "active":
            if cc:
                return None
            return _Result("consent" if conn is None else "reconsent")
        state = self._assess(conn, self._clock())
        if isinstance(state, Expired):
            pass
        elif conn.version != seen_version or (not force and isinstance(state, Fresh)):
            return _Result("ok", conn)  # someone else refreshed (or it was never due)
        if not cc and not conn.tokens.refresh_token:
            if force or isinstance(state, Expired):
                return _Result("reconsent")
            return _Result("ok", conn)
        return None

    async def _stored(self, identity: Identity, cfg: ProviderConfig, conn: Connection | None,
                      grant: TokenGrant) -> _Result:
        """Persist a successful answer (invariant 6: before anyone uses the new token)."""
        key = (identity.id, cfg.name)
        epoch = self._epoch
        now = self._clock()
        if conn is None or conn.status != "active":  # client_credentials: first token
            stored: Connection | None = await self._store.put_connection(
                identity.id, cfg.name, grant.tokens, None, now)
        else:
            merged = merge_refresh(conn.tokens, grant.tokens)
            try:
                stored = await self._store.update_tokens(identity.id, cfg.name, conn.version,
                                                         merged, now)
            except StoreUnavailable:
                self._parked[key] = _Parked(conn.version, merged)
                log.warning("refreshed tokens for provider %s could not be stored; kept to be "
                            "stored first on the next attempt", cfg.name)
                self._event(identity, cfg.name, "failed")
                fallback = self._after_transient(key, conn, DEFAULT_RETRY_AFTER)
                if fallback.kind == "stale_ok":
                    return fallback
                raise
        if stored is None:
            # The row changed under the lock (a consent or revoke by a path that does not take
            # it). What the store holds now wins; our new tokens are dropped, unused.
            log.warning("connection for provider %s changed during its refresh", cfg.name)
            latest = await self._read(key)
            return self._settled(cfg, latest, None if conn is None else conn.version, False) \
                or _Result("unavailable")
        if epoch == self._epoch:
            self._remember(key, stored)
        self._retry_at.pop(key, None)
        self._event(identity, cfg.name, "ok")
        return _Result("ok", stored)

    async def _store_parked(self, identity: Identity, cfg: ProviderConfig,
                            conn: Connection | None) -> Connection | None:
        """Store the parked tokens (under the refresh lock) if the row is still the one they
        were refreshed from; the connection as it is afterwards."""
        key = (identity.id, cfg.name)
        parked = self._parked[key]
        if conn is None or conn.status != "active" or conn.version != parked.version:
            self._parked.pop(key, None)  # superseded (a consent, a revoke, another refresh)
            return conn
        stored = await self._store.update_tokens(identity.id, cfg.name, parked.version,
                                                 parked.tokens, self._clock())
        self._parked.pop(key, None)
        if stored is None:
            return await self._read(key)
        self._remember(key, stored)
        self._retry_at.pop(key, None)
        self._event(identity, cfg.name, "ok")
        return stored

    async def _failed(self, identity: Identity, cfg: ProviderConfig, conn: Connection | None,
                      err: OAuthError) -> _Result:
        key = (identity.id, cfg.name)
        now = self._clock()
        expires_at = None if conn is None else conn.tokens.expires_at
        if conn is None:  # client_credentials with nothing stored: nothing to fall back on
            expires_at = -math.inf
        decision = decide_after_refresh_failure(err, expires_at, now)
        log.warning("token refresh for provider %s failed: %s", cfg.name, err.error)
        if isinstance(decision, Reconsent) and cfg.grant != "client_credentials":
            assert conn is not None
            latest = await self._read(key)  # rotated a moment ago by someone else?
            if latest is None or latest.version != conn.version or latest.status != "active":
                log.info("refresh token for provider %s was superseded; not final", cfg.name)
                return self._settled(cfg, latest, conn.version, False) or _Result("unavailable")
            await self._store.set_status(identity.id, cfg.name, "reconsent_required", now)
            self._cache.pop(key, None)
            self._event(identity, cfg.name, "reconsent_required")
            return _Result("reconsent")
        self._event(identity, cfg.name, "failed")
        if isinstance(decision, UseCurrent) and conn is not None:
            return self._after_transient(key, conn, decision.retry_after)
        retry_after = getattr(decision, "retry_after", DEFAULT_RETRY_AFTER)
        return _Result("unavailable" if err.transient else "broken", conn, retry_after)

    def _after_transient(self, key: _Key, conn: Connection | None,
                         retry_after: float) -> _Result:
        now = self._clock()
        if conn is not None and conn.status == "active" and (
                conn.tokens.expires_at is None or now < conn.tokens.expires_at):
            self._retry_at[key] = now + retry_after
            return _Result("stale_ok", conn, retry_after)
        return _Result("unavailable", conn, retry_after)

    # ------------------------------------------------------------------ helpers

    def _provider(self, name: str) -> ProviderConfig:
        cfg = self._providers.get(name)
        if cfg is None:
            raise UnknownProvider(f"no provider named {name!r} is configured")
        return cfg

    async def _gateway_owner(self, identity: Identity, cfg: ProviderConfig) -> Identity:
        """The identity a client_credentials token is kept under (created on first use; a
        concurrent creation elsewhere is fine), once ``identity`` may use ``cfg``."""
        if cfg.identities is not None and identity.name not in cfg.identities:
            raise ProviderForbidden(f"identity {identity.name!r} may not use provider "
                                    f"{cfg.name}", provider=cfg.name)
        if self._owner is None:
            owner = await self._store.get_identity(GATEWAY_IDENTITY)
            if owner is None:
                try:
                    owner = await self._store.create_identity(GATEWAY_IDENTITY, None,
                                                              self._clock())
                except BadRequest:  # created a moment ago by another process
                    owner = await self._store.get_identity(GATEWAY_IDENTITY)
            if owner is None:
                raise StoreUnavailable("the gateway's own identity could not be created")
            self._owner = owner
        return self._owner

    def _assess(self, conn: Connection, now: float) -> Assessment:
        return assess(conn.tokens.expires_at, _issued_at(conn), now, self._skew)

    async def _read(self, key: _Key) -> Connection | None:
        epoch = self._epoch
        conn = await self._store.get_connection(*key)
        if epoch == self._epoch:
            self._remember(key, conn)
        return conn

    def _remember(self, key: _Key, conn: Connection | None) -> None:
        if conn is None or conn.status != "active":
            self._cache.pop(key, None)
            return
        old = self._cache.get(key)
        if old is None or old.conn.version <= conn.version:
            self._cache[key] = _Cached(conn, _to_lease(conn, self._providers.get(key[1])))

    def _lease_of(self, key: _Key, conn: Connection) -> Lease:
        cached = self._cache.get(key)
        if cached is not None and cached.conn is conn:
            return cached.lease
        return _to_lease(conn, self._providers.get(key[1]))

    @staticmethod
    def _reconsent(provider: str) -> ReconsentRequired:
        return ReconsentRequired(f"the connection to provider {provider} must be authorized "
                                 "again", provider=provider)

    def _error(self, result: _Result, provider: str) -> Exception:
        if result.kind == "consent":
            return ConsentRequired(f"no connection to provider {provider} yet; authorize it "
                                   "first", provider=provider)
        if result.kind == "reconsent":
            return self._reconsent(provider)
        return TokenEndpointUnavailable(
            f"the token endpoint of provider {provider} is unavailable",
            retry_after=math.ceil(result.retry_after))

    def _event(self, identity: Identity, provider: str, outcome: str) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(EVENT_REFRESHED, identity.name, provider, outcome)
        except Exception:  # a metrics/audit hook must never break a refresh
            log.exception("on_event hook failed")
