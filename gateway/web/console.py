"""The web console: log in and out, see every provider's state, connect, disconnect, and
manage one's own gateway keys. Every state-changing form is a POST with the session's CSRF
token; pages are server-rendered with no script at all.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from yarl import URL

from gateway.config import Config, ProviderConfig
from gateway.connections import revoke_connection
from gateway.errors import GatewayError
from gateway.identities import IdentityService
from gateway.oauth.client import OAuthClient
from gateway.store.base import AuditEvent, Store
from gateway.web.pages import message, redirect, render
from gateway.web.sessions import BrowserSessions, Current

LOGIN_CSRF_COOKIE = "gateway_login_csrf"
MAX_FAILURES = 5
FAILURE_WINDOW = 900.0


@dataclass(slots=True)
class LoginThrottle:
    """Slows down password guessing per identity name and per client address: after
    MAX_FAILURES failures within the window, each further try waits exponentially longer."""

    clock: Callable[[], float] = time.time
    failures: dict[str, list[float]] = field(default_factory=dict)

    def blocked_for(self, *keys: str) -> float:
        now = self.clock()
        wait = 0.0
        for k in keys:
            recent = [t for t in self.failures.get(k, []) if now - t < FAILURE_WINDOW]
            self.failures[k] = recent
            if len(recent) >= MAX_FAILURES:
                backoff = min(2 ** (len(recent) - MAX_FAILURES), 300)
                wait = max(wait, recent[-1] + backoff - now)
        return max(0.0, wait)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        for k in keys:
            self.failures.setdefault(k, []).append(now)
        if len(self.failures) > 100_000:  # bound memory under a spray of names
            self.failures.clear()

    def succeeded(self, *keys: str) -> None:
        for k in keys:
            self.failures.pop(k, None)


def _safe_next(target: str | None) -> str:
    """Only paths on the gateway's own pages: never an open redirect."""
    if target and target.startswith("/_gateway/") and "//" not in target and "\\" not in target:
        return target
    return "/_gateway/"


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
        self.throttle = LoginThrottle(clock)

    # ------------------------------------------------------------------ login

    async def login_page(self, request: web.Request, *, error: str | None = None,
                         name: str = "", status: int = 200,
                         next_target: str | None = None) -> web.StreamResponse:
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
        resp = render(request, "login.html", {
            "csrf": token, "next": _safe_next(next_target or request.query.get("next")),
            "error": error, "name": name}, status=status)
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict",
                        secure=self._config.server.public_url.scheme == "https",
                        path="/_gateway/login", max_age=3600)
        return resp

    async def login_post(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        name = str(form.get("name", ""))[:64]
        password = str(form.get("password", ""))
        next_target = _safe_next(str(form.get("next", "")))
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie or not secrets.compare_digest(cookie, str(form.get("csrf", ""))):
            return await self.login_page(request, error="Your login form expired; try again.",
                                         name=name, status=403, next_target=next_target)
        address = request.remote or "?"
        keys = (f"name:{name.lower()}", f"addr:{address}")
        wait = self.throttle.blocked_for(*keys)
        if wait > 0:
            resp = await self.login_page(
                request, error=f"Too many failed logins; try again in {int(wait) + 1} seconds.",
                name=name, status=429, next_target=next_target)
            resp.headers["Retry-After"] = str(int(wait) + 1)
            return resp
        identity = await self._identities.verify_password(name, password)
        if identity is None:
            self.throttle.failed(*keys)
            await self._audit_login(name, ok=False)
            return await self.login_page(request, error="Wrong identity name or password.",
                                         name=name, status=401, next_target=next_target)
        self.throttle.succeeded(*keys)
        await self._audit_login(identity.name, ok=True)
        resp = redirect(next_target, status=303)
        await self._sessions.start(resp, identity, request)
        resp.del_cookie(LOGIN_CSRF_COOKIE, path="/_gateway/login")
        return resp

    async def _audit_login(self, name: str, *, ok: bool) -> None:
        try:
            await self._store.add_audit(AuditEvent(
                at=self._clock(), kind="login.succeeded" if ok else "login.failed",
                outcome="ok" if ok else "failed", identity=name or None))
        except GatewayError:
            pass  # an audit hiccup must not lock people out

    async def logout(self, request: web.Request) -> web.StreamResponse:
        current = await self._sessions.current(request)
        if request.method == "POST":
            form = await request.post()
            if current is not None and not self._sessions.csrf_ok(current, str(form.get("csrf", ""))):
                return message(request, "Request refused", "CSRF check failed.", status=403,
                               code="csrf_failed")
        resp = redirect("/_gateway/login", status=303)
        await self._sessions.end(request, resp)
        return resp

    # ------------------------------------------------------------------ dashboard

    async def _require(self, request: web.Request) -> Current | web.StreamResponse:
        current = await self._sessions.current(request)
        if current is None:
            return redirect(str(URL("/_gateway/login").with_query(next=str(request.rel_url))))
        return current

    async def dashboard(self, request: web.Request, *, new_key: str | None = None,
                        note: str | None = None) -> web.StreamResponse:
        current = await self._require(request)
        if not isinstance(current, Current):
            return current
        conns = {c.provider: c for c in await self._store.list_connections(current.identity.id)}
        rows = []
        for name, p in sorted(self._providers().items()):
            c = conns.get(name)
            if not p.usable:
                state = "unusable"
            elif c is None:
                state = "none"
            else:
                state = "reconsent" if c.status == "reconsent_required" else "connected"
            rows.append({
                "name": name, "state": state, "problems": "; ".join(p.problems),
                "grant": p.grant,
                "account": c.account_id if c else None,
                "scopes": " ".join(c.tokens.scopes) if c else "",
                "expires": _when(c.tokens.expires_at) if c else "",
                "refreshed": _when(c.refreshed_at) if c else "",
            })
        keys = await self._identities.list_keys(current.identity.name)
        base = str(self._config.server.public_url).rstrip("/")
        return render(request, "dashboard.html", {
            "identity": current.identity.name, "rows": rows, "csrf": current.session.csrf_token,
            "keys": [{"prefix": k.prefix, "created": _when(k.created_at),
                      "last_used": _when(k.last_used_at) if k.last_used_at else "never"}
                     for k in keys if k.revoked_at is None],
            "new_key": new_key, "note": note, "base": base,
        })

    async def _checked_post(self, request: web.Request) -> tuple[Current, Mapping[str, str]] | web.StreamResponse:
        current = await self._require(request)
        if not isinstance(current, Current):
            return current
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if not self._sessions.csrf_ok(current, form.get("csrf")):
            return message(request, "Request refused", "The form was not sent from the gateway's "
                           "own page (CSRF check failed).", status=403, code="csrf_failed")
        return current, form

    async def disconnect(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked_post(request)
        if not isinstance(checked, tuple):
            return checked
        current, _ = checked
        name = request.match_info["provider"]
        outcome = await revoke_connection(self._store, self._oauth, self._providers().get(name),
                                          current.identity.id, name)
        self._on_disconnected(current.identity.id, name)
        return await self.dashboard(request, note=f"{name}: {outcome.note}.")

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
        try:
            await self._identities.revoke_key(current.identity.name, form.get("prefix", ""))
        except GatewayError as e:
            return await self.dashboard(request, note=e.message)
        return await self.dashboard(request, note=f"Key {form.get('prefix')}… revoked.")


def _when(t: float | None) -> str:
    if t is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
