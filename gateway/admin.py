"""Administration: one implementation of the operator's operations, two front ends.

:class:`AdminOps` lists, creates and removes identities and their keys, lists and revokes
connections and reads the audit trail. The ``gateway`` CLI and the HTTP admin API under
``/_gateway/api/admin/`` both call it, so they validate, audit and answer alike.

The HTTP API speaks JSON and is authenticated with ``Authorization: Bearer <admin key>``
(``admin.key`` in the config, or ``GATEWAY_ADMIN_KEY``), compared in constant time. With no
admin key configured the API does not exist: every path under it answers 404, as any
unknown gateway path does. Answers carrying a new gateway key are ``Cache-Control:
no-store``; nothing else returned ever carries a secret (keys are listed by prefix,
connections by metadata).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from gateway.audit import CONNECTION_REVOKED, AuditLog, parse_since
from gateway.config import MIN_ADMIN_KEY, ProviderConfig
from gateway.connections import RevokeOutcome, revoke_connection
from gateway.errors import BadRequest, Unauthenticated
from gateway.identities import IdentityService, validate_name
from gateway.oauth.client import OAuthClient
from gateway.store.base import ApiKey, AuditEvent, Identity, Store

log = logging.getLogger("gateway.admin")

PREFIX = "/_gateway/api/admin"
MAX_LIMIT = 10_000


class NotFound(BadRequest):
    """An identity or connection the request names does not exist (CLI: exit 2)."""

    status, code = 404, "not_found"


@dataclass(frozen=True, slots=True)
class IdentitySummary:
    name: str
    created_at: float
    has_password: bool
    active_keys: int


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """A connection's metadata: never a token."""

    identity: str
    provider: str
    status: str
    expires_at: float | None
    scopes: tuple[str, ...]
    account_id: str | None
    created_at: float
    updated_at: float
    refreshed_at: float | None


class AdminOps:
    """The operations behind ``gateway identity|connections|audit`` and the admin API."""

    def __init__(self, store: Store, identities: IdentityService, audit: AuditLog,
                 oauth: OAuthClient, providers: Callable[[], Mapping[str, ProviderConfig]],
                 on_revoked: Callable[[int, str | None], None] = lambda i, p: None) -> None:
        self._store = store
        self._identities = identities
        self._audit = audit
        self._oauth = oauth
        self._providers = providers
        self._on_revoked = on_revoked  # e.g. drop this process's cached tokens

    async def _identity(self, name: str) -> Identity:
        validate_name(name)
        identity = await self._store.get_identity(name)
        if identity is None:
            raise NotFound(f"identity '{name}' does not exist")
        return identity

    # ------------------------------------------------------------------ identities

    async def list_identities(self) -> list[IdentitySummary]:
        out = []
        for i in await self._identities.list_identities():
            keys = await self._store.list_api_keys(i.id)
            out.append(IdentitySummary(i.name, i.created_at, i.password_hash is not None,
                                       sum(k.revoked_at is None for k in keys)))
        return out

    async def add_identity(self, name: str, password: str | None = None) -> tuple[Identity, str]:
        """Create an identity; returns it with its first key (shown this once)."""
        return await self._identities.add_identity(name, password)

    async def remove_identity(self, name: str) -> list[str]:
        """Delete the identity with everything it owns; returns the providers whose grants
        were forgotten here (not revoked at the provider)."""
        identity = await self._identity(name)
        providers = sorted(c.provider for c in await self._store.list_connections(identity.id))
        await self._identities.remove_identity(name)
        self._on_revoked(identity.id, None)
        return providers

    async def list_keys(self, name: str) -> Sequence[ApiKey]:
        await self._identity(name)
        return await self._identities.list_keys(name)

    async def add_key(self, name: str) -> str:
        await self._identity(name)
        return await self._identities.add_key(name)

    async def revoke_key(self, name: str, prefix: str) -> None:
        await self._identity(name)
        await self._identities.revoke_key(name, prefix)

    # ------------------------------------------------------------------ connections

    async def list_connections(self, identity: str | None = None) -> list[ConnectionSummary]:
        names = {i.id: i.name for i in await self._identities.list_identities()}
        identity_id = (await self._identity(identity)).id if identity is not None else None
        return [ConnectionSummary(
            names.get(c.identity_id, f"#{c.identity_id}"), c.provider, c.status,
            c.tokens.expires_at, tuple(c.tokens.scopes), c.account_id, c.created_at,
            c.updated_at, c.refreshed_at)
            for c in await self._store.list_connections(identity_id)]

    async def revoke_connection(self, identity: str, provider: str) -> RevokeOutcome:
        """Revoke at the provider when it can (RFC 7009), then forget the tokens; audited."""
        found = await self._identity(identity)
        if await self._store.get_connection(found.id, provider) is None:
            raise NotFound(f"identity '{identity}' has no connection to '{provider}'")
        outcome = await revoke_connection(self._store, self._oauth,
                                          self._providers().get(provider), found.id, provider)
        self._on_revoked(found.id, provider)
        await self._audit.write(CONNECTION_REVOKED,
                                "ok" if outcome.revoked_at_provider else "not_at_provider",
                                identity=identity, provider=provider, detail=outcome.note)
        return outcome

    # ------------------------------------------------------------------ audit

    async def audit_events(self, identity: str | None = None, since: float | None = None,
                           limit: int = 1000) -> Sequence[AuditEvent]:
        if identity is not None:
            validate_name(identity)  # a removed identity's history stays queryable
        return await self._audit.query(identity=identity, since=since, limit=limit)


# --------------------------------------------------------------------------- HTTP API

OpsOf = Callable[[web.Request], AdminOps]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"},
                             dumps=lambda d: json.dumps(d, default=_plain))


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, tuple | frozenset | set):
        return list(value)
    raise TypeError(type(value).__name__)


def _key_json(k: ApiKey) -> dict[str, Any]:
    return {"prefix": k.prefix, "created_at": k.created_at, "last_used_at": k.last_used_at,
            "revoked_at": k.revoked_at, "active": k.revoked_at is None}


def _event_json(e: AuditEvent) -> dict[str, Any]:
    return {"id": e.id, "at": e.at, "kind": e.kind, "outcome": e.outcome,
            "identity": e.identity, "provider": e.provider, "detail": e.detail}


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


def _text(data: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required.")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string.")
    return value


class AdminApi:
    """The routes under ``/_gateway/api/admin/``; ``key`` None means the API is off."""

    def __init__(self, ops_of: OpsOf, key: str | None, clock: Callable[[], float]) -> None:
        self._ops_of = ops_of
        self._digest = _digest(key) if key else None
        self._clock = clock

    def add_routes(self, router: web.UrlDispatcher) -> None:
        p = PREFIX
        table: list[tuple[str, str, Handler]] = [
            ("GET", f"{p}/identities", self.identities),
            ("POST", f"{p}/identities", self.identity_add),
            ("DELETE", f"{p}/identities/{{name}}", self.identity_remove),
            ("GET", f"{p}/identities/{{name}}/keys", self.keys),
            ("POST", f"{p}/identities/{{name}}/keys", self.key_add),
            ("DELETE", f"{p}/identities/{{name}}/keys/{{prefix}}", self.key_revoke),
            ("GET", f"{p}/connections", self.connections),
            ("DELETE", f"{p}/connections/{{identity}}/{{provider}}", self.connection_revoke),
            ("GET", f"{p}/audit", self.audit),
        ]
        for method, path, handler in table:
            router.add_route(method, path, self._guarded(handler))
        router.add_route("*", p + "{tail:(/.*)?}", self._guarded(self.unknown))

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            self._authorize(request)
            return await handler(request)

        return guarded

    def _authorize(self, request: web.Request) -> None:
        if self._digest is None:
            raise NotFound(f"No gateway page at {request.path}.")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(_digest(given.strip()),
                                                                self._digest)
        if not ok:
            log.warning("admin API: refused %s %s from %s", request.method, request.path,
                        request.remote)
            raise Unauthenticated("Send the admin key as 'Authorization: Bearer <key>'.")

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        raise NotFound(f"No admin endpoint {request.method} {request.path}.")

    # ------------------------------------------------------------------ identities

    async def identities(self, request: web.Request) -> web.Response:
        return _json({"identities": await self._ops_of(request).list_identities()})

    async def identity_add(self, request: web.Request) -> web.Response:
        data = await _body(request)
        name = _text(data, "name", required=True)
        assert name is not None
        identity, key = await self._ops_of(request).add_identity(name, _text(data, "password"))
        return _json({"identity": {"name": identity.name, "created_at": identity.created_at,
                                   "has_password": identity.password_hash is not None},
                      "key": key, "prefix": key[:12]}, status=201)

    async def identity_remove(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        forgotten = await self._ops_of(request).remove_identity(name)
        return _json({"removed": name, "connections_forgotten": forgotten})

    async def keys(self, request: web.Request) -> web.Response:
        keys = await self._ops_of(request).list_keys(request.match_info["name"])
        return _json({"keys": [_key_json(k) for k in keys]})

    async def key_add(self, request: web.Request) -> web.Response:
        key = await self._ops_of(request).add_key(request.match_info["name"])
        return _json({"key": key, "prefix": key[:12]}, status=201)

    async def key_revoke(self, request: web.Request) -> web.Response:
        name, prefix = request.match_info["name"], request.match_info["prefix"]
        await self._ops_of(request).revoke_key(name, prefix)
        return _json({"revoked": prefix[:12]})

    # ------------------------------------------------------------------ connections, audit

    async def connections(self, request: web.Request) -> web.Response:
        identity = request.query.get("identity") or None
        return _json({"connections": await self._ops_of(request).list_connections(identity)})

    async def connection_revoke(self, request: web.Request) -> web.Response:
        identity, provider = request.match_info["identity"], request.match_info["provider"]
        outcome = await self._ops_of(request).revoke_connection(identity, provider)
        return _json({"identity": identity, "provider": provider,
                      "revoked_at_provider": outcome.revoked_at_provider, "note": outcome.note})

    async def audit(self, request: web.Request) -> web.Response:
        q = request.query
        since = parse_since(q["since"], self._clock()) if q.get("since") else None
        try:
            limit = int(q.get("limit", "1000"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}.")
        events = await self._ops_of(request).audit_events(q.get("identity") or None, since,
                                                          limit)
        return _json({"events": [_event_json(e) for e in events]})


def check_admin_key(key: str | None, where: str = "admin.key") -> str | None:
    """The admin key if it is long enough to resist guessing; raise otherwise (naming
    ``where`` it came from, never the key)."""
    from gateway.errors import ConfigError

    if key is None or key == "":
        return None
    if len(key) < MIN_ADMIN_KEY:
        raise ConfigError(where, f"must be at least {MIN_ADMIN_KEY} characters "
                          "(generate one with `gateway keygen`)")
    return key
