"""Consent: the authorization-code flow run through the gateway (RFC 6749 §4.1, RFC 7636,
RFC 9700 §2.1 and §4.7).

Theory of operation
-------------------
1. A flow starts for one identity and one provider: from the dashboard (a logged-in browser),
   or from a signed *connect link* that a program got from ``POST /_gateway/api/connect/<p>``
   or from a ``consent_required`` answer. With ``consent.require_login`` (the default) a link
   only works in a browser logged in as the link's identity, after a confirmation POST with a
   CSRF token: otherwise one identity could trick another person into attaching that person's
   provider account to it.
2. Starting stores a *pending authorization* (hash of ``state``, identity, provider, the PKCE
   verifier encrypted, nonce, return_to, 10-minute expiry) and sets a flow cookie bound to the
   state, then redirects to the provider.
3. The callback checks the flow cookie (the browser that started the flow must finish it:
   RFC 9700 §4.7), consumes the pending authorization atomically (single use; unknown,
   expired or replayed state stores nothing), exchanges the code with the verifier, verifies
   an id_token when there is one, and replaces the connection's tokens in one write.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from gateway.config import Config, ProviderConfig
from gateway.errors import BadRequest, GatewayError, TooManyRequests, UnknownProvider
from gateway.oauth import protocol
from gateway.oauth.client import OAuthClient
from gateway.store.base import Identity, PendingAuthorization, Store
from gateway.web import links
from gateway.web.pages import message, redirect, render
from gateway.web.sessions import BrowserSessions

log = logging.getLogger("gateway.consent")

MAX_PENDING_PER_IDENTITY = 20
FLOW_COOKIE_PREFIX = "gateway_flow_"
EventHook = Callable[[str, str | None, str | None, str], None]


@dataclass(frozen=True, slots=True)
class ConnectOffer:
    url: str
    expires_at: float


def _state_hash(state: str) -> bytes:
    return hashlib.sha256(state.encode()).digest()


class ConsentFlow:
    def __init__(self, config: Config, store: Store, oauth: OAuthClient,
                 sessions: BrowserSessions, *, link_key: bytes, flow_key: bytes,
                 providers: Callable[[], Mapping[str, ProviderConfig]],
                 on_connected: Callable[[int, str], None],
                 verify_id_token: Callable[..., object] | None = None,
                 on_event: EventHook | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._store = store
        self._oauth = oauth
        self._sessions = sessions
        self._link_key = link_key
        self._flow_key = flow_key
        self._providers = providers
        self._on_connected = on_connected
        self._verify_id_token = verify_id_token
        self._on_event = on_event or (lambda *a: None)
        self._clock = clock
        self._public = config.server.public_url

    # ------------------------------------------------------------------ links

    def offer(self, identity: Identity, provider: str) -> ConnectOffer:
        """A signed, single-use connect link for (identity, provider)."""
        token, link = links.issue(self._link_key, identity.id, provider, self._clock(),
                                  self._config.consent.link_ttl)
        url = self._public.with_path(
            self._public.path.rstrip("/") + f"/_gateway/connect/{provider}").with_query(link=token)
        return ConnectOffer(str(url), link.expires_at)

    def _provider(self, name: str) -> ProviderConfig:
        p = self._providers().get(name)
        if p is None:
            raise UnknownProvider(f"No provider named {name!r} is configured.")
        if not p.usable:
            raise BadRequest(f"Provider {name!r} is not usable yet: {'; '.join(p.problems)}.")
        if p.grant != "authorization_code":
            raise BadRequest(f"Provider {name!r} uses the {p.grant} grant; it needs no consent.")
        return p

    # ------------------------------------------------------------------ handlers

    async def api_connect(self, request: web.Request, identity: Identity) -> web.Response:
        name = request.match_info["provider"]
        self._provider(name)
        offer = self.offer(identity, name)
        return web.json_response({"connect_url": offer.url, "expires_at": int(offer.expires_at)},
                                 headers={"Cache-Control": "no-store"})

    async def connect_page(self, request: web.Request) -> web.StreamResponse:
        """GET /_gateway/connect/<provider>[?link=...][&return_to=...]."""
        name = request.match_info["provider"]
        try:
            self._provider(name)
            token = request.query.get("link")
            link = links.verify(self._link_key, token, name, self._clock()) if token else None
        except GatewayError as e:
            return message(request, "Cannot connect", e.message, status=e.status, code=e.code)
        current = await self._sessions.current(request)
        need_login = link is None or self._config.consent.require_login
        if need_login and current is None:
            return redirect(str(URL("/_gateway/login").with_query(next=str(request.rel_url))))
        if link is None:
            assert current is not None
            return await self._start(request, current.identity, name, request.query.get("return_to"))
        if current is not None and current.identity.id != link.identity_id and need_login:
            return message(request, "Wrong identity",
                           f"This link connects {name} for another identity than the one you "
                           f"are logged in as ({current.identity.name}). Log out and log in as "
                           "the identity the link was made for.", status=403, code="forbidden",
                           next_url="/_gateway/logout", next_label="Log out")
        identity = await self._store.get_identity_by_id(link.identity_id)
        if identity is None:
            return message(request, "Cannot connect", "This link's identity no longer exists.",
                           status=400, code="bad_request")
        if not self._config.consent.require_login:
            return await self._redeem(request, link, identity, name)
        assert current is not None
        return render(request, "confirm.html", {
            "identity": identity.name, "provider": name, "link": token,
            "return_to": request.query.get("return_to", ""),
            "csrf": current.session.csrf_token,
        })

    async def connect_post(self, request: web.Request) -> web.StreamResponse:
        """POST /_gateway/connect/<provider>: the confirmation (or dashboard button)."""
        name = request.match_info["provider"]
        form = await request.post()
        current = await self._sessions.current(request)
        if current is None:
            return redirect("/_gateway/login")
        if not self._sessions.csrf_ok(current, _field(form, "csrf")):
            return message(request, "Request refused", "The form was not sent from the gateway's "
                           "own page (CSRF check failed).", status=403, code="csrf_failed")
        try:
            self._provider(name)
            token = _field(form, "link")
            if not token:
                return await self._start(request, current.identity, name, _field(form, "return_to"))
            link = links.verify(self._link_key, token, name, self._clock())
        except GatewayError as e:
            return message(request, "Cannot connect", e.message, status=e.status, code=e.code)
        if link.identity_id != current.identity.id:
            return message(request, "Wrong identity", "This link is for another identity.",
                           status=403, code="forbidden")
        return await self._redeem(request, link, current.identity, name, _field(form, "return_to"))

    async def _redeem(self, request: web.Request, link: links.ConnectLink, identity: Identity,
                      name: str, return_to: str | None = None) -> web.StreamResponse:
        if not await self._store.use_link(link.link_id, link.expires_at, self._clock()):
            return message(request, "Link already used", "This connect link was already used. "
                           "Ask for a new one.", status=400, code="bad_request")
        return await self._start(request, identity, name,
                                 return_to if return_to is not None else request.query.get("return_to"))

    async def _start(self, request: web.Request, identity: Identity, name: str,
                     return_to: str | None) -> web.StreamResponse:
        try:
            provider = self._provider(name)
            return_to = self._checked_return_to(return_to or None)
            now = self._clock()
            if await self._store.count_pending(identity.id, now) >= MAX_PENDING_PER_IDENTITY:
                raise TooManyRequests("Too many unfinished connection attempts; "
                                      "try again in a few minutes.", retry_after=60)
        except GatewayError as e:
            resp = message(request, "Cannot connect", e.message, status=e.status, code=e.code)
            if isinstance(e, TooManyRequests):  # RFC 6585 §4
                resp.headers["Retry-After"] = str(e.retry_after)
            return resp
        state = protocol.new_state()
        verifier, challenge = protocol.new_pkce() if provider.pkce else (None, None)
        nonce = protocol.new_nonce() if "openid" in provider.scopes else None
        await self._store.add_pending(PendingAuthorization(
            state_hash=_state_hash(state), identity_id=identity.id, provider=name,
            code_verifier=verifier, nonce=nonce, return_to=return_to, created_at=now,
            expires_at=now + self._config.consent.pending_ttl))
        url = protocol.authorize_url(provider, redirect_uri=self._config.server.redirect_uri,
                                     state=state, code_challenge=challenge, nonce=nonce)
        self._on_event("consent.started", identity.name, name, "ok")
        resp = redirect(url)
        resp.set_cookie(*self._flow_cookie(state), httponly=True, samesite="Lax",
                        secure=self._public.scheme == "https", path="/_gateway/callback",
                        max_age=int(self._config.consent.pending_ttl))
        return resp

    def _flow_cookie(self, state: str) -> tuple[str, str]:
        mac = hmac.new(self._flow_key, state.encode(), hashlib.sha256).hexdigest()
        return FLOW_COOKIE_PREFIX + mac[:12], mac[12:]

    def _checked_return_to(self, return_to: str | None) -> str | None:
        """Only gateway-relative paths or allowlisted origins: never an open redirect."""
        if return_to is None:
            return None
        try:
            u = URL(return_to)
        except ValueError:
            raise BadRequest("return_to is not a valid URL.") from None
        if not u.is_absolute():
            if return_to.startswith("/_gateway/") and "\\" not in return_to and "//" not in return_to:
                return return_to
            raise BadRequest("return_to must be a /_gateway/ path or an allowed origin.")
        if u.scheme in ("http", "https") and str(u.origin()) in self._config.consent.return_to_origins:
            return return_to
        raise BadRequest("return_to is not on the consent.return_to_origins allowlist.")

    async def callback(self, request: web.Request) -> web.StreamResponse:
        """GET /_gateway/callback: RFC 6749 §4.1.2 (and §4.1.2.1 for errors)."""
        q = request.query
        state = q.get("state")
        if not state or len(state) > 512:
            return message(request, "Connection failed", "The provider's answer carries no valid "
                           "state. Start again from the dashboard.", status=400, code="bad_request")
        cookie_name, cookie_value = self._flow_cookie(state)
        if not hmac.compare_digest(request.cookies.get(cookie_name, "").encode(), cookie_value.encode()):
            return message(request, "Connection failed", "This answer belongs to a connection "
                           "started in another browser (or its 10 minutes ran out). Start again "
                           "from this browser.", status=400, code="bad_request")
        now = self._clock()
        pending = await self._store.take_pending(_state_hash(state), now)
        if pending is None:
            return message(request, "Connection failed", "This connection attempt is unknown, "
                           "expired or already completed. Start again.", status=400,
                           code="bad_request")
        identity = await self._store.get_identity_by_id(pending.identity_id)
        ident_name = identity.name if identity else None
        resp = await self._finish(request, pending, identity)
        resp.del_cookie(cookie_name, path="/_gateway/callback")
        self._on_event("consent.completed" if resp.status < 400 else "consent.failed",
                       ident_name, pending.provider, "ok" if resp.status < 400 else "failed")
        return resp

    async def _finish(self, request: web.Request, pending: PendingAuthorization,
                      identity: Identity | None) -> web.StreamResponse:
        q = request.query
        name = pending.provider
        if identity is None:
            return message(request, "Connection failed", "The identity no longer exists.",
                           status=400, code="bad_request")
        if "error" in q:
            err = q.get("error", "")[:64]
            text = ("You declined access." if err == "access_denied"
                    else f"The provider reported an error ({err}).")
            return message(request, f"{name} was not connected", text, status=400,
                           code="consent_denied" if err == "access_denied" else "provider_error",
                           next_url=f"/_gateway/connect/{name}", next_label="Try again")
        code = q.get("code")
        if not code:
            return message(request, "Connection failed", "The provider's answer has no code.",
                           status=400, code="bad_request")
        try:
            provider = self._provider(name)
        except GatewayError as e:
            return message(request, "Connection failed", e.message, status=e.status, code=e.code)
        result = await self._oauth.exchange_code(
            provider, code=code, redirect_uri=self._config.server.redirect_uri,
            code_verifier=pending.code_verifier, now=self._clock())
        if isinstance(result, protocol.OAuthError):
            log.warning("code exchange failed provider=%s error=%s status=%s", name,
                        result.error, result.status)
            status = 503 if result.transient else 502
            return message(request, f"{name} was not connected",
                           f"The provider refused to issue tokens ({result.error}). Try again.",
                           status=status, code="token_exchange_failed",
                           next_url=f"/_gateway/connect/{name}", next_label="Try again")
        account_id = None
        if result.id_token and self._verify_id_token is not None:
            try:
                claims = await self._verify_id_token(provider, result.id_token, pending.nonce)  # type: ignore[misc]
            except GatewayError as e:
                return message(request, f"{name} was not connected",
                               f"The provider's identity token failed verification: {e.message}",
                               status=502, code=e.code)
            account_id = str(claims.get("sub")) if isinstance(claims, dict) and claims.get("sub") else None
        await self._store.put_connection(identity.id, name, result.tokens, account_id, self._clock())
        self._on_connected(identity.id, name)
        if pending.return_to:
            try:
                target = self._checked_return_to(pending.return_to)
            except GatewayError:
                target = None
            if target:
                return redirect(target, status=303)
        return message(request, f"{name} connected",
                       f"The gateway now holds {name} tokens for {identity.name}. Programs using "
                       f"this identity's gateway key can call /{name}/… right away.")


def _field(form: Mapping[str, object], name: str) -> str | None:
    v = form.get(name)
    return v if isinstance(v, str) else None
