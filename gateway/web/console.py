"""The web console: log in and out, see every provider's state, connect, disconnect, and
manage one's own gateway keys. Every state-changing form is a POST with the session's CSRF
token (the login form, which has no session yet, uses a double-submit cookie); pages are
server-rendered with no script at all.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL

from gateway.config import Config, ProviderConfig
from gateway.connections import revoke_connection
from gateway.errors import GatewayError
from gateway.identities import IdentityService
from gateway.oauth.client import OAuthClient
from gateway.store.base import AuditEvent, Connection, Store
from gateway.web.pages import message, redirect, render
from gateway.web.sessions import BrowserSessions, Current

LOGIN_CSRF_COOKIE = "gateway_login_csrf"
MAX_FAILURES = 5
FAILURE_WINDOW = 900.0
MAX_BACKOFF = 300.0
MAX_THROTTLE_KEYS = 100_000
DASHBOARD = "/_gateway/"
# Gateway-relative paths with ordinary URL characters only: no scheme, no host, no "//" (a
# protocol-relative URL), no backslash or control characters (which browsers "fix" into one).
_SAFE_NEXT = re.compile(r"^/_gateway/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*$")


@dataclass(slots=True)
class LoginThrottle:
    """Slows down password guessing per identity name and per client address: after
    MAX_FAILURES failures within the window, each further try waits exponentially longer.

    Kept in memory, per process: a restart forgets it, which only gives a guesser one more
    small batch of tries."""

    clock: Callable[[], float] = time.time
    failures: dict[str, list[float]] = field(default_factory=dict)

    def blocked_for(self, *keys: str) -> float:
        """Seconds until another try is allowed (0: allowed now)."""
        now = self.clock()
        wait = 0.0
        for k in keys:
            recent = [t for t in self.failures.get(k, []) if now - t < FAILURE_WINDOW]
            if recent:
                self.failures[k] = recent
            else:
                self.failures.pop(k, None)
            if len(recent) >= MAX_FAILURES:
                backoff = min(2.0 ** (len(recent) - MAX_FAILURES), MAX_BACKOFF)
                wait = max(wait, recent[-1] + backoff - now)
        return max(0.0, wait)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        for k in keys:
            self.failures.setdefault(k, []).append(now)
        if len(self.failures) > MAX_THROTTLE_KEYS:
            self._evict(now)

    def succeeded(self, *keys: str) -> None:
        for k in keys:
            self.failures.pop(k, None)

    def _evict(self, now: float) -> None:
        """Bound memory under a spray of names without forgetting the sprayer: drop what
        is outside the window, then the keys whose last failure is oldest."""
        live = {k: v for k, v in self.failures.items() if v and now - v[-1] < FAILURE_WINDOW}
        if len(live) > MAX_THROTTLE_KEYS // 2:
            newest = sorted(live, key=lambda k: live[k][-1], reverse=True)
            live = {k: live[k] for k in newest[:MAX_THROTTLE_KEYS // 2]}
        self.failures = live


def safe_next(target: str | None) -> str:
    """Only paths on the gateway's own pages: never an open redirect."""
    if target and _SAFE_NEXT.match(target) and "//" not in target:
        return target
    return DASHBOARD


class Console:
    def __init__(self, config: Config, store: Store, identities: IdentityService,
                 sessions: BrowserSessions, oauth: OAuthClient,
                 providers: Callable[[], Mapping[str, ProviderConfig]],
                 on_disconnected: Callable[[int, str], None],
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._store = store
        self._identities = identities
        self._sessions = sessions
        self._oauth = oauth
        self._providers = providers
        self._on_disconnected = on_disconnected
        self._clock = clock
        self._secure = config.server.public_url.scheme == "https"
        self.throttle = LoginThrottle(clock)

    # ------------------------------------------------------------------ login

    async def login_page(self, request: web.Request, *, error: str | None = None,
                         name: str = "", status: int = 200,
                         next_target: str | None = None) -> web.StreamResponse:
        target = safe_next(next_target or request.query.get("next"))
        if request.method == "GET" and await self._sessions.current(request) is not None:
            return redirect(target, status=303)
        token = request.cookies.get(LOGIN_CSRF_COOKIE)
        if not token or len(token) > 64:
            token = secrets.token_urlsafe(24)
        info = "You are logged out." if "logged_out" in request.query and not error else None
        resp = render(request, "login.html", {
            "csrf": token, "next": target, "error": error, "name": name, "info": info},
            status=status)
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict",
                        secure=self._secure, path="/_gateway/login", max_age=3600)
        return resp

    async def login_post(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        name = str(form.get("name", "")).strip()[:64]
        password = str(form.get("password", ""))
        next_target = safe_next(str(form.get("next", "")))
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "").encode()
        if not cookie or not secrets.compare_digest(cookie, str(form.get("csrf", "")).encode()):
            resp = await self.login_page(request, error="Your login form expired; please try "
                                         "again.", name=name, status=403, next_target=next_target)
            resp.headers["Gateway-Error"] = "csrf_failed"
            return resp
        keys = (f"name:{name.lower()}", f"addr:{request.remote or '?'}")
        wait = self.throttle.blocked_for(*keys)
        if wait > 0:
            seconds = math.ceil(wait)
            resp = await self.login_page(
                request, error=f"Too many failed logins. Try again in {seconds} seconds.",
                name=name, status=429, next_target=next_target)
            resp.headers["Retry-After"] = str(seconds)
            resp.headers["Gateway-Error"] = "too_many_requests"
            return resp
        identity = await self._identities.verify_password(name, password)
        if identity is None:
            self.throttle.failed(*keys)
            await self._audit_login(name, ok=False)
            return await self.login_page(request, error="Wrong identity name or password.",
                                         name=name, status=401, next_target=next_target)
        # Only the name's count is forgiven: logging in to one's own account must not reset
        # the address's count of guesses at other names.
        self.throttle.succeeded(keys[0])
        await self._audit_login(identity.name, ok=True)
        resp = redirect(next_target, status=303)
        await self._sessions.start(resp, identity, request)
        resp.del_cookie(LOGIN_CSRF_COOKIE, path="/_gateway/login", secure=self._secure,
                        httponly=True, samesite="Strict")
        return resp

    async def _audit_login(self, name: str, *, ok: bool) -> None:
        try:
            await self._store.add_audit(AuditEvent(
                at=self._clock(), kind="login.succeeded" if ok else "login.failed",
                outcome="ok" if ok else "failed", identity=name or None))
        except GatewayError:
            pass  # an audit hiccup must not lock people out

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """GET asks (a link or a prefetch must not log anyone out); POST with CSRF does it."""
        current = await self._sessions.current(request)
        if current is not None and current.via == "header":
            return message(request, "Signed in by single sign-on",
                           f"You are signed in as {current.identity.name} by your "
                           "organisation's login proxy. Log out there.")
        if current is None:
            resp = redirect("/_gateway/login", status=303)
            await self._sessions.end(request, resp)  # drop a stale cookie
            return resp
        if request.method != "POST":
            return render(request, "logout.html", {"identity": current.identity.name,
                                                   "csrf": current.session.csrf_token})
        form = await request.post()
        if not self._sessions.csrf_ok(current, _field(form, "csrf")):
            return _csrf_refused(request)
        resp = redirect("/_gateway/login?logged_out=1", status=303)
        await self._sessions.end(request, resp)
        return resp

    # ------------------------------------------------------------------ dashboard

    async def _require(self, request: web.Request) -> Current | web.StreamResponse:
        current = await self._sessions.current(request)
        if current is None:
            target = str(request.rel_url) if request.method == "GET" else DASHBOARD
            return redirect(str(URL("/_gateway/login").with_query(next=target)))
        return current

    async def dashboard(self, request: web.Request, *, new_key: str | None = None,
                        note: str | None = None, problem: str | None = None,
                        status: int = 200) -> web.StreamResponse:
        current = await self._require(request)
        if not isinstance(current, Current):
            return current
        conns = {c.provider: c for c in await self._store.list_connections(current.identity.id)}
        rows = [_row(name, p, conns.get(name))
                for name, p in sorted(self._providers().items())]
        keys = await self._identities.list_keys(current.identity.name)
        base = str(self._config.server.public_url).rstrip("/")
        return render(request, "dashboard.html", {
            "identity": current.identity.name, "sso": current.via == "header",
            "rows": rows, "csrf": current.session.csrf_token,
            "keys": [{"prefix": k.prefix, "created": _when(k.created_at),
                      "last_used": _when(k.last_used_at) if k.last_used_at else "never"}
                     for k in keys if k.revoked_at is None],
            "new_key": new_key, "note": note, "problem": problem, "base": base,
        }, status=status)

    async def _checked_post(self, request: web.Request
                            ) -> tuple[Current, Mapping[str, str]] | web.StreamResponse:
        current = await self._require(request)
        if not isinstance(current, Current):
            return current
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if not self._sessions.csrf_ok(current, form.get("csrf")):
            return _csrf_refused(request)
        return current, form

    async def disconnect(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked_post(request)
        if not isinstance(checked, tuple):
            return checked
        current, _ = checked
        name = request.match_info["provider"]
        outcome = await revoke_connection(self._store, self._oauth, self._providers().get(name),
                                          current.identity.id, name)
        if outcome.existed:
            self._on_disconnected(current.identity.id, name)
        else:
            return await self.dashboard(request, problem=f"{name} was not connected.")
        return await self.dashboard(request, note=f"{name} disconnected: {outcome.note}.")

    async def key_create(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked_post(request)
        if not isinstance(checked, tuple):
            return checked
        key = await self._identities.add_key(checked[0].identity.name)
        return await self.dashboard(request, new_key=key)

    async def key_revoke(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked_post(request)
        if not isinstance(checked, tuple):
            return checked
        current, form = checked
        prefix = form.get("prefix", "").strip()[:64]
        try:
            await self._identities.revoke_key(current.identity.name, prefix)
        except GatewayError:
            return await self.dashboard(request, problem="That key is unknown or already "
                                        "revoked.", status=400)
        return await self.dashboard(request, note=f"Key {prefix}… revoked. Programs using it "
                                    "are refused from now on.")


def _csrf_refused(request: web.Request) -> web.Response:
    return message(request, "Request refused", "The form was not sent from the gateway's own "
                   "page, or it is too old (CSRF check failed). Nothing was changed. Reload the "
                   "page and try again.", status=403, code="csrf_failed")


def _row(name: str, p: ProviderConfig, c: Connection | None) -> dict[str, Any]:
    """One provider's line on the dashboard: its state for this identity, and the details."""
    if not p.usable:
        state = "unusable"
    elif c is not None:
        state = "reconsent" if c.status == "reconsent_required" else "connected"
    elif p.grant != "authorization_code":
        state = "app"
    else:
        state = "none"
    return {
        "name": name, "state": state, "problems": "; ".join(p.problems),
        "consent": p.grant == "authorization_code",
        "account": c.account_id if c else None,
        "scopes": " ".join(c.tokens.scopes) if c else "",
        "expires": (_when(c.tokens.expires_at) if c.tokens.expires_at else "does not expire")
        if c else "",
        "refreshed": _when(c.refreshed_at) if c and c.refreshed_at else "not yet",
        "callable": state in ("connected", "app"),
    }


def _field(form: Mapping[str, object], name: str) -> str | None:
    v = form.get(name)
    return v if isinstance(v, str) else None


def _when(t: float | None) -> str:
    if t is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))
