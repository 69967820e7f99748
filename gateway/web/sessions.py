"""Browser sessions for the gateway's own pages.

The cookie holds a random id (256 bits); the store keeps only its SHA-256, so a copy of the
database does not let anyone log in. Sessions live in the store (survive restarts, work across
instances), get a new id at every login (no fixation), and expire after an idle period and an
absolute lifetime. Each session has its own CSRF token for the forms it shows.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.store.base import Identity, Store, WebSession

SESSION_COOKIE = "gateway_session"


@dataclass(frozen=True, slots=True)
class Current:
    session: WebSession
    identity: Identity


SESSION_KEY: web.RequestKey[Current | None] = web.RequestKey("gateway.session")


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


class BrowserSessions:
    def __init__(self, store: Store, *, secure: bool, idle: float = 8 * 3600,
                 absolute: float = 7 * 86400, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._secure = secure
        self._idle = idle
        self._absolute = absolute
        self._clock = clock

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
        return session

    async def current(self, request: web.Request) -> Current | None:
        if SESSION_KEY in request:
            return request[SESSION_KEY]
        found = await self._lookup(request)
        request[SESSION_KEY] = found
        return found

    async def _lookup(self, request: web.Request) -> Current | None:
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid or len(sid) > 128:
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
        if now - session.last_seen_at > 60:  # don't write on every page view
            await self._store.touch_session(session.id_hash, now)
        return Current(session, identity)

    async def end(self, request: web.Request, response: web.StreamResponse) -> None:
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            await self._store.delete_session(_hash(sid))
        request[SESSION_KEY] = None
        response.del_cookie(SESSION_COOKIE, path="/_gateway/")

    @staticmethod
    def csrf_ok(current: Current | None, submitted: str | None) -> bool:
        return bool(current and submitted
                    and hmac.compare_digest(current.session.csrf_token.encode(), submitted.encode()))
