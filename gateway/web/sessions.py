"""Browser sessions for the gateway's own pages.

The cookie holds a random id (256 bits); the store keeps only its SHA-256, so a copy of the
database does not let anyone log in. Sessions live in the store (survive restarts, work across
instances), get a new id at every login (no fixation), and expire after an idle period and an
absolute lifetime. Each session has its own CSRF token for the forms it shows.

Trusted-header mode (``auth.trusted_header``): behind an SSO proxy, a request whose *socket
peer* (never a forwarded-for header, which the client controls) lies in
``auth.trusted_proxies`` is logged in as the identity the header names. Such a browser has no
cookie session, so its CSRF token lives in a store record of its own whose id hash no cookie
can produce (a cookie id must look like one the gateway issued).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from gateway.errors import GatewayError
from gateway.store.base import Identity, Store, WebSession

SESSION_COOKIE = "gateway_session"
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
TOUCH_EVERY = 60.0  # seconds: don't write to the store on every page view
MAX_HEADER_NAME = 64

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Current:
    """Who is looking at the page, and how we know: a cookie session or the SSO header."""

    session: WebSession
    identity: Identity
    via: Literal["cookie", "header"] = "cookie"


SESSION_KEY: web.RequestKey[Current | None] = web.RequestKey("gateway.session")


@dataclass(frozen=True, slots=True)
class TrustedHeader:
    """``auth.trusted_header`` with the networks it is honoured from."""

    header: str
    networks: tuple[Network, ...]

    @classmethod
    def from_config(cls, config: Any) -> TrustedHeader | None:
        """From ``Config.auth`` (``trusted_header``, ``trusted_proxies`` as CIDR strings)."""
        auth = getattr(config, "auth", None)
        header = getattr(auth, "trusted_header", None)
        if not header:
            return None
        nets = tuple(ipaddress.ip_network(str(n), strict=False)
                     for n in getattr(auth, "trusted_proxies", ()) or ())
        return cls(str(header), nets)

    def honoured_from(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            addr = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


def socket_peer(request: web.Request) -> str | None:
    """The address of the connection itself (a proxy's, when there is one)."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    return None


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def _header_session_hash(identity: Identity) -> bytes:
    # Contains a NUL, so no cookie value (which must match _SESSION_ID) hashes to it.
    return hashlib.sha256(b"trusted-header\x00%d" % identity.id).digest()


class BrowserSessions:
    def __init__(self, store: Store, *, secure: bool, idle: float = 8 * 3600,
                 absolute: float = 7 * 86400, clock: Callable[[], float] = time.time,
                 trusted: TrustedHeader | Literal["from_app"] | None = "from_app") -> None:
        self._store = store
        self._secure = secure
        self._idle = idle
        self._absolute = absolute
        self._clock = clock
        # "from_app": read ``auth`` from the app's config on first use (until the composition
        # root passes it explicitly).
        self._trusted = trusted

    async def start(self, response: web.StreamResponse, identity: Identity,
                    request: web.Request | None = None) -> WebSession:
        """Begin a fresh session (a new id even when one existed: no session fixation)."""
        if request is not None:
            await self.end(request, response)
        now = self._clock()
        sid = secrets.token_urlsafe(32)
        session = WebSession(id_hash=_hash(sid), identity_id=identity.id,
                             csrf_token=secrets.token_urlsafe(32), created_at=now,
                             last_seen_at=now, expires_at=now + self._absolute)
        await self._store.add_session(session)
        response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="Lax",
                            secure=self._secure, path="/_gateway/", max_age=int(self._absolute))
        if request is not None:
            request[SESSION_KEY] = Current(session, identity)
        return session

    async def current(self, request: web.Request) -> Current | None:
        """The logged-in identity of this request, if any (looked up once per request)."""
        if SESSION_KEY in request:
            return request[SESSION_KEY]
        trusted = self._trusted_header(request.app)
        name = request.headers.get(trusted.header) if trusted is not None else None
        if trusted is not None and name is not None and trusted.honoured_from(socket_peer(request)):
            found = await self._from_header(name.strip())
        else:
            found = await self._lookup(request)
        request[SESSION_KEY] = found
        return found

    def _trusted_header(self, app: web.Application) -> TrustedHeader | None:
        if self._trusted == "from_app":
            from gateway.app import CONFIG  # late: gateway.app imports this module

            config = app.get(CONFIG)
            self._trusted = TrustedHeader.from_config(config) if config is not None else None
        return self._trusted

    async def _lookup(self, request: web.Request) -> Current | None:
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid or not _SESSION_ID.match(sid):
            return None
        now = self._clock()
        session = await self._store.get_session(_hash(sid), now)
        if session is None:
            return None
        if session.last_seen_at + self._idle <= now:
            await self._store.delete_session(session.id_hash)
            return None
        identity = await self._store.get_identity_by_id(session.identity_id)
        if identity is None:
            return None
        if now - session.last_seen_at > TOUCH_EVERY:
            await self._store.touch_session(session.id_hash, now)
        return Current(session, identity)

    async def _from_header(self, name: str) -> Current | None:
        """The proxy vouches for ``name``; an unknown name is nobody (never a cookie's user)."""
        if not name or len(name) > MAX_HEADER_NAME:
            return None
        identity = await self._store.get_identity(name)
        if identity is None:
            return None
        now = self._clock()
        id_hash = _header_session_hash(identity)
        session = await self._store.get_session(id_hash, now)
        if session is None:
            await self._store.delete_session(id_hash)  # an expired record, if any
            session = WebSession(id_hash=id_hash, identity_id=identity.id,
                                 csrf_token=secrets.token_urlsafe(32), created_at=now,
                                 last_seen_at=now, expires_at=now + self._absolute)
            try:
                await self._store.add_session(session)
            except GatewayError:  # a concurrent request made it first: use theirs
                raced = await self._store.get_session(id_hash, now)
                if raced is None:
                    raise
                session = raced
        return Current(session, identity, via="header")

    async def end(self, request: web.Request, response: web.StreamResponse) -> None:
        """Forget the cookie session server-side (a copied cookie stops working too)."""
        sid = request.cookies.get(SESSION_COOKIE)
        if sid and _SESSION_ID.match(sid):
            await self._store.delete_session(_hash(sid))
        request[SESSION_KEY] = None
        response.del_cookie(SESSION_COOKIE, path="/_gateway/", secure=self._secure,
                            httponly=True, samesite="Lax")

    @staticmethod
    def csrf_ok(current: Current | None, submitted: str | None) -> bool:
        return bool(current and submitted and hmac.compare_digest(
            current.session.csrf_token.encode(), submitted.encode()))
