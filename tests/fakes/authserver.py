"""A fake OAuth 2.0 / OpenID Connect authorization server, as a real aiohttp app.

Used by tests across the project. It is strict where real servers are strict, so a test
against it proves protocol behaviour, not just plumbing:

* ``GET /authorize`` (RFC 6749 §4.1.1, RFC 7636 §4.3) validates client_id and redirect_uri
  (errors there are a 400 page, never a redirect: §4.1.2.1), then response_type, PKCE
  parameters, scopes and duplicate parameters (errors redirect with ``error=``). With
  ``auto_approve`` (default) it redirects 302 straight back with ``code`` + ``state`` (or
  ``error=access_denied`` when ``deny``); otherwise it shows a login + consent form
  (``#username``, ``#approve``, ``#deny``) that POSTs back to ``/authorize``.
* ``POST /token``: ``authorization_code`` (PKCE verifier vs challenge, redirect_uri
  identical to the authorize one, codes single use and expiring, reuse revokes what the
  code issued: §4.1.2), ``refresh_token`` (rotation on/off, rotated-out tokens are
  ``invalid_grant`` unless within ``refresh_grace``, optional reuse detection),
  ``client_credentials``. Client authentication exactly per the registered method
  (§2.3.1 Basic with form-encoded id/secret, ``client_secret_post``, ``none``); one method
  per request. ``id_token`` (RS256, with ``nonce``) when the scope contains ``openid``.
* ``POST /revoke`` (RFC 7009), ``GET /userinfo``, ``GET /jwks``,
  ``/.well-known/openid-configuration`` and ``/.well-known/oauth-authorization-server``.

Knobs are plain attributes, changeable mid-test: ``expires_in`` (None omits it),
``auto_approve``, ``username``, ``deny``, ``rotate_refresh_tokens``, ``refresh_grace``,
``reuse_detection``, ``issue_refresh_tokens``, ``omit_refresh_token``,
``form_encoded_responses``, ``token_type`` (None omits it), ``extra_token_fields``,
``require_pkce``, ``scope_separator``, ``supported_scopes``, ``code_ttl``, ``clock``.
Provider quirks (each default is RFC behaviour): ``scope_param`` (the authorize parameter
carrying scopes; another name makes a plain ``scope`` an error), ``json_requests`` (token and
revoke requests must be JSON bodies, not forms), ``form_content_type`` (the Content-Type of
``form_encoded_responses``, to lie about it), ``nest_tokens_under`` (code-exchange answers
put the token members in this object, Slack style, beside a top-level decoy bot token that
is not valid; refresh answers stay flat), ``expires_at_field`` + ``expires_at_format``
(``epoch`` or ``iso``: an absolute expiry member) with ``send_expires_in``, and
``revocation_method`` (``rfc7009``; ``bearer``: the access token as Bearer credentials, no
body, Slack's ``200 {"ok": false}`` on failure; ``access_token_param``: form
``access_token=``, no client authentication; both revoke the whole grant).
``fail_next(...)`` queues canned failures; ``token_delay`` is an :class:`asyncio.Event`
gate (set = open) in front of ``/token``: clear it, gather requests, ``await
wait_for_hits("token", n)``, then set it: concurrency without sleeps.

Counters: ``hits[endpoint]`` (``authorize``, ``token``, ``revoke``, ``userinfo``, ``jwks``,
``discovery``), ``grants[grant_type]``; ``requests`` records every request (with secrets:
it is a test fake). Usage::

    fake = await start_auth_server(aiohttp_server)             # default client registered
    provider = fake.provider_config("fake", upstream="http://...")
    assert fake.is_valid_access_token(token) == "alice"
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus, urlencode

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from multidict import MultiMapping
from yarl import URL

from gateway.config import ProviderConfig, with_problems

DEFAULT_CLIENT_ID = "gateway-test"
# Deliberately awkward: a client that skips the §2.3.1 form-encoding before Basic fails.
DEFAULT_CLIENT_SECRET = "s3cret:+ %/&="
FORM = "application/x-www-form-urlencoded"
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")  # RFC 7636 §4.1
_CHALLENGE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")  # §4.2 (S256 yields 43 chars)
_KEY_CACHE: list[rsa.RSAPrivateKey] = []


def _new_rsa_key(reuse: bool = True) -> rsa.RSAPrivateKey:
    """RSA keygen costs ~0.1 s; tests share one key unless they rotate."""
    if reuse and _KEY_CACHE:
        return _KEY_CACHE[0]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if not _KEY_CACHE:
        _KEY_CACHE.append(key)
    return key


@dataclass
class RegisteredClient:
    client_id: str
    secret: str | None = None
    auth_method: str = "client_secret_basic"  # client_secret_post | none
    redirect_uris: tuple[str, ...] | None = None  # None: any absolute http(s) URI


@dataclass
class IssuedCode:
    code: str
    client_id: str
    redirect_uri: str
    redirect_uri_sent: bool  # §4.1.3: then the token request must repeat it identically
    subject: str
    scopes: tuple[str, ...]
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    expires_at: float
    used: bool = False
    issued: list[str] = field(default_factory=list)  # tokens issued from it


@dataclass
class AccessToken:
    token: str
    subject: str
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float | None
    family: str | None = None  # refresh-token family it came from
    revoked: bool = False


@dataclass
class RefreshToken:
    token: str
    subject: str
    client_id: str
    scopes: tuple[str, ...]
    family: str
    used_at: float | None = None  # set when rotated out
    successor: str | None = None
    revoked: bool = False


@dataclass(frozen=True)
class Failure:
    status: int
    body: bytes
    content_type: str | None
    headers: Mapping[str, str]


@dataclass(frozen=True)
class RecordedRequest:
    endpoint: str
    method: str
    headers: Mapping[str, str]
    params: Mapping[str, str]  # query for GET, form for POST


class _Reject(Exception):
    """An OAuth error response to send (§5.2 for the token endpoint)."""

    def __init__(self, error: str, description: str, status: int = 400,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status
        self.headers = dict(headers or {})


class FakeAuthServer:
    """See the module docstring. Construct, then ``start_auth_server`` (or serve ``.app``)."""

    def __init__(self, *, issuer: str | None = None, expires_in: int | None = 3600,
                 auto_approve: bool = True, username: str = "alice",
                 rotate_refresh_tokens: bool = True, refresh_grace: float = 0.0,
                 reuse_detection: bool = False, omit_refresh_token: bool = False,
                 issue_refresh_tokens: bool = True, form_encoded_responses: bool = False,
                 require_pkce: bool = False, code_ttl: float = 60.0,
                 clock: Callable[[], float] = time.time, default_client: bool = True) -> None:
        self._url: URL | None = None
        self.issuer = issuer
        self.expires_in = expires_in
        self.auto_approve = auto_approve
        self.username = username
        self.deny = False
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.refresh_grace = refresh_grace
        self.reuse_detection = reuse_detection
        self.omit_refresh_token = omit_refresh_token
        self.issue_refresh_tokens = issue_refresh_tokens
        self.form_encoded_responses = form_encoded_responses
        self.require_pkce = require_pkce
        self.code_ttl = code_ttl
        self.clock = clock
        self.token_type: str | None = "Bearer"
        self.extra_token_fields: dict[str, Any] = {}
        self.scope_separator = " "
        self.supported_scopes: set[str] | None = None
        self.scope_param = "scope"
        self.json_requests = False
        self.form_content_type = FORM
        self.nest_tokens_under: str | None = None
        self.expires_at_field: str | None = None
        self.expires_at_format = "epoch"
        self.send_expires_in = True
        self.revocation_method = "rfc7009"
        self.token_delay = asyncio.Event()
        self.token_delay.set()
        self.hits: Counter[str] = Counter()
        self.grants: Counter[str] = Counter()
        self.requests: list[RecordedRequest] = []
        self.clients: dict[str, RegisteredClient] = {}
        self.codes: dict[str, IssuedCode] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self._failures: dict[str, deque[Failure]] = {}
        self._waiters: list[tuple[str, int, asyncio.Future[None]]] = []
        self._keys: list[tuple[str, rsa.RSAPrivateKey]] = [("k1", _new_rsa_key())]
        self._app: web.Application | None = None
        if default_client:
            self.add_client(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)

    # ------------------------------------------------------------------ setup helpers

    def add_client(self, client_id: str, secret: str | None = None, *,
                   auth_method: str = "client_secret_basic",
                   redirect_uris: Iterable[str] | None = None) -> RegisteredClient:
        """Register a client. ``auth_method='none'`` is a public client (no secret)."""
        assert auth_method in ("client_secret_basic", "client_secret_post", "none")
        assert (secret is None) == (auth_method == "none"), "secret iff confidential"
        client = RegisteredClient(client_id, secret, auth_method,
                                  None if redirect_uris is None else tuple(redirect_uris))
        self.clients[client_id] = client
        return client

    @property
    def url(self) -> URL:
        """Base URL (``http://127.0.0.1:PORT``), known once started."""
        if self._url is None:
            raise RuntimeError("FakeAuthServer is not started (use start_auth_server)")
        return self._url

    @url.setter
    def url(self, value: URL) -> None:
        self._url = value

    @property
    def app(self) -> web.Application:
        if self._app is None:
            self._app = self.make_app()
        return self._app

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_post("/revoke", self._revoke)
        app.router.add_get("/userinfo", self._userinfo)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/.well-known/oauth-authorization-server", self._discovery)

        async def open_gate(_: web.Application) -> None:
            self.token_delay.set()  # never leave a held request blocking shutdown

        app.on_shutdown.append(open_gate)
        return app

    def provider_config(self, name: str = "fake", *, client_id: str = DEFAULT_CLIENT_ID,
                        **overrides: Any) -> ProviderConfig:
        """A ProviderConfig pointing at this server for ``client_id`` (needs ``.url``)."""
        client = self.clients[client_id]
        fields: dict[str, Any] = {
            "name": name, "issuer": URL(self.issuer_url()),
            "authorize_url": self.url / "authorize", "token_url": self.url / "token",
            "revocation_url": self.url / "revoke", "client_id": client.client_id,
            "client_secret": client.secret or "", "client_auth": client.auth_method,
        }
        fields.update(overrides)
        return with_problems(ProviderConfig(**fields))

    def config_entry(self, *, client_id: str = DEFAULT_CLIENT_ID,
                     **overrides: Any) -> dict[str, Any]:
        """The same as a YAML ``providers.<name>`` mapping, for ``write_config``."""
        client = self.clients[client_id]
        entry: dict[str, Any] = {
            "authorize_url": str(self.url / "authorize"), "token_url": str(self.url / "token"),
            "revocation_url": str(self.url / "revoke"), "client_id": client.client_id,
            "client_auth": client.auth_method,
        }
        if client.secret is not None:
            entry["client_secret"] = client.secret
        entry.update(overrides)
        return entry

    def issuer_url(self, request: web.Request | None = None) -> str:
        if self.issuer:
            return self.issuer
        if self._url is not None:
            return str(self._url)
        assert request is not None
        return str(request.url.origin())

    # ------------------------------------------------------------------ test knobs

    def fail_next(self, n: int = 1, status: int = 500,
                  body: bytes | str = b'{"error":"server_error"}',
                  content_type: str | None = "application/json", *, endpoint: str = "token",
                  headers: Mapping[str, str] | None = None) -> None:
        """Answer the next ``n`` requests to ``endpoint`` ('token' or 'revoke') with this."""
        raw = body.encode() if isinstance(body, str) else body
        queue = self._failures.setdefault(endpoint, deque())
        queue.extend(Failure(status, raw, content_type, dict(headers or {})) for _ in range(n))

    def hold_tokens(self) -> None:
        """Close the ``token_delay`` gate: /token requests wait (counted) until released."""
        self.token_delay.clear()

    def release_tokens(self) -> None:
        self.token_delay.set()

    async def wait_for_hits(self, endpoint: str, n: int) -> None:
        """Return once ``hits[endpoint] >= n`` (counted on arrival, before the gate)."""
        if self.hits[endpoint] >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((endpoint, n, fut))
        await fut

    def issue_tokens(self, subject: str, *, client_id: str = DEFAULT_CLIENT_ID,
                     scopes: Iterable[str] = (), refresh: bool = True) -> dict[str, Any]:
        """Mint tokens without a flow (seeding a store); returns the token response body."""
        return self._grant(subject, client_id, tuple(scopes), refresh=refresh)

    def is_valid_access_token(self, token: str) -> str | None:
        """The subject (user, or client_id for client_credentials) if usable now, else None."""
        at = self.access_tokens.get(token)
        if at is None or at.revoked:
            return None
        if at.expires_at is not None and self.clock() >= at.expires_at:
            return None
        return at.subject

    def is_valid_refresh_token(self, token: str) -> str | None:
        rt = self.refresh_tokens.get(token)
        return None if rt is None or rt.revoked or rt.used_at is not None else rt.subject

    def expire_access_tokens(self, subject: str | None = None) -> int:
        """Make access tokens expire now (refresh tokens stay valid): upstream 401 tests."""
        n = 0
        for at in self.access_tokens.values():
            if subject is None or at.subject == subject:
                at.expires_at, n = self.clock() - 1, n + 1
        return n

    def revoke_user(self, subject: str) -> int:
        """Revoke every token of ``subject`` (the user withdrew consent at the provider)."""
        items: list[AccessToken | RefreshToken] = [*self.access_tokens.values(),
                                                   *self.refresh_tokens.values()]
        hit = [t for t in items if t.subject == subject and not t.revoked]
        for t in hit:
            t.revoked = True
        return len(hit)

    def revoke_token(self, token: str) -> bool:
        """Revoke one token as ``/revoke`` would (a refresh token takes its family along)."""
        if token in self.access_tokens:
            self.access_tokens[token].revoked = True
            return True
        rt = self.refresh_tokens.get(token)
        if rt is None:
            return False
        self._revoke_family(rt.family)
        return True

    def rotate_signing_key(self, *, keep_old: bool = False) -> str:
        """Sign with a new key (new kid); the old one stays in the JWKS only if ``keep_old``."""
        kid = f"k{len(self._keys) + 1}-{secrets.token_hex(2)}"
        entry = (kid, _new_rsa_key(reuse=False))
        self._keys = [entry, *self._keys] if keep_old else [entry]
        return kid

    def sign_id_token(self, claims: Mapping[str, Any], *, kid: str | None = None,
                      key: rsa.RSAPrivateKey | None = None) -> str:
        """Sign arbitrary claims with the current key (tests forge bad tokens with it)."""
        cur_kid, cur_key = self._keys[0]
        return jwt.encode(dict(claims), key or cur_key, algorithm="RS256",
                          headers={"kid": kid or cur_kid})

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self._keys:
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}

    # ------------------------------------------------------------------ internals

    def _hit(self, endpoint: str, request: web.Request, params: Mapping[str, str]) -> None:
        self.hits[endpoint] += 1
        self.requests.append(RecordedRequest(endpoint, request.method, dict(request.headers),
                                             dict(params)))
        for w in [w for w in self._waiters if self.hits[w[0]] >= w[1]]:
            self._waiters.remove(w)
            if not w[2].done():
                w[2].set_result(None)

    def _failure(self, endpoint: str) -> web.Response | None:
        queue = self._failures.get(endpoint)
        if not queue:
            return None
        f = queue.popleft()
        resp = web.Response(status=f.status, body=f.body, headers=f.headers)
        if f.content_type:
            resp.content_type = f.content_type
        return resp

    def _reply(self, data: Mapping[str, Any], status: int = 200,
               headers: Mapping[str, str] | None = None) -> web.Response:
        """Token endpoint answer: JSON (RFC 6749 §5.1) or form-encoded when asked to."""
        hdrs = {"Cache-Control": "no-store", "Pragma": "no-cache", **(headers or {})}
        if self.form_encoded_responses:
            body = urlencode({k: str(v) for k, v in data.items()})
            return web.Response(status=status, body=body.encode(), headers={
                **hdrs, "Content-Type": self.form_content_type})
        return web.json_response(dict(data), status=status, headers=hdrs)

    def _error(self, e: _Reject) -> web.Response:
        return self._reply({"error": e.error, "error_description": e.description},
                           e.status, e.headers)

    @staticmethod
    def _single(params: MultiMapping[Any]) -> dict[str, str]:
        """§3.1/§3.2: parameters MUST NOT be included more than once."""
        out: dict[str, str] = {}
        for k in params:
            values = params.getall(k)
            if len(values) > 1 or not isinstance(values[0], str):
                raise _Reject("invalid_request", f"parameter {k} repeated or not text")
            out[k] = values[0]
        return out

    async def _form(self, request: web.Request) -> dict[str, str]:
        if self.json_requests:
            if request.content_type != "application/json":
                raise _Reject("invalid_request", "content type must be application/json")
            try:
                data = json.loads(await request.read())
            except ValueError:
                raise _Reject("invalid_request", "body is not JSON") from None
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise _Reject("invalid_request", "body must be an object of strings")
            return data
        if request.content_type != FORM:
            raise _Reject("invalid_request", f"content type must be {FORM}")
        return self._single(await request.post())

    def _authenticate(self, request: web.Request, form: Mapping[str, str]) -> RegisteredClient:
        """RFC 6749 §2.3: exactly one method, the one the client registered."""
        auth = request.headers.get("Authorization")
        basic = {"WWW-Authenticate": 'Basic realm="fake"'}
        if auth is not None:
            scheme, _, cred = auth.partition(" ")
            if scheme.lower() != "basic":
                raise _Reject("invalid_client", "unsupported authentication scheme", 401, basic)
            if "client_secret" in form:
                raise _Reject("invalid_request", "more than one client authentication method")
            try:
                raw = base64.b64decode(cred.strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise _Reject("invalid_client", "malformed Basic credentials", 401, basic) from None
            cid_enc, sep, secret_enc = raw.partition(":")
            # §2.3.1: both halves are form-encoded (Appendix B) before base64.
            cid, secret = unquote_plus(cid_enc), unquote_plus(secret_enc)
            client = self.clients.get(cid)
            if (not sep or client is None or client.auth_method != "client_secret_basic"
                    or form.get("client_id", cid) != cid
                    or not secrets.compare_digest((client.secret or "").encode(), secret.encode())):
                raise _Reject("invalid_client", "client authentication failed", 401, basic)
            return client
        client = self.clients.get(form.get("client_id", ""))
        if client is None:
            raise _Reject("invalid_client", "client authentication failed", 401)
        if "client_secret" in form:
            if client.auth_method != "client_secret_post" or not secrets.compare_digest(
                    (client.secret or "").encode(), form["client_secret"].encode()):
                raise _Reject("invalid_client", "client authentication failed", 401)
            return client
        if client.auth_method != "none":
            raise _Reject("invalid_client", "client authentication failed", 401)
        return client

    # ------------------------------------------------------------------ /authorize

    def _authorize_client(self, p: Mapping[str, str]) -> tuple[RegisteredClient, str]:
        """§4.1.2.1: a bad client_id or redirect_uri must NOT redirect; show an error."""
        client = self.clients.get(p.get("client_id", ""))
        if client is None:
            raise web.HTTPBadRequest(text="unknown client_id")
        uri = p.get("redirect_uri")
        if uri is None:
            if not client.redirect_uris or len(client.redirect_uris) != 1:
                raise web.HTTPBadRequest(text="redirect_uri is required")
            return client, client.redirect_uris[0]
        if client.redirect_uris is not None and uri not in client.redirect_uris:
            raise web.HTTPBadRequest(text="redirect_uri is not registered")
        u = URL(uri)
        if u.scheme not in ("http", "https") or not u.host or u.fragment:
            raise web.HTTPBadRequest(text="redirect_uri must be an absolute URI")
        return client, uri

    def _authorize_params(self, p: Mapping[str, str]) -> tuple[str, ...]:
        """Validate what may be reported by redirect (§4.1.2.1, RFC 7636 §4.4.1)."""
        if p.get("response_type") != "code":
            raise _Reject("unsupported_response_type", "only response_type=code")
        challenge, method = p.get("code_challenge"), p.get("code_challenge_method")
        if challenge is None:
            if method is not None:
                raise _Reject("invalid_request", "code_challenge_method without code_challenge")
            if self.require_pkce:
                raise _Reject("invalid_request", "PKCE is required")
        else:
            if (method or "plain") != "S256":
                raise _Reject("invalid_request", "transform algorithm not supported")
            if not _CHALLENGE.match(challenge):
                raise _Reject("invalid_request", "malformed code_challenge")
        if self.scope_param != "scope" and "scope" in p:
            raise _Reject("invalid_scope", f"user scopes go in {self.scope_param}")
        raw = p.get(self.scope_param, "")
        scopes = tuple(s for s in raw.split(self.scope_separator) if s)
        if self.supported_scopes is not None and not set(scopes) <= self.supported_scopes:
            raise _Reject("invalid_scope", "unknown scope")
        return scopes

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        raw: MultiMapping[Any] = await request.post() if request.method == "POST" else request.query
        try:
            p = self._single(raw)
        except _Reject as e:
            raise web.HTTPBadRequest(text=e.description) from None
        self._hit("authorize", request, p)
        client, redirect_uri = self._authorize_client(p)

        def back(**params: str) -> web.HTTPFound:
            if "state" in p:
                params["state"] = p["state"]
            return web.HTTPFound(URL(redirect_uri).extend_query(params))

        try:
            scopes = self._authorize_params(p)
        except _Reject as e:
            raise back(error=e.error, error_description=e.description) from None
        if request.method == "GET" and not self.auto_approve:
            return web.Response(text=self._consent_page(p, client), content_type="text/html")
        approve = not self.deny if request.method == "GET" else p.get("action") == "approve"
        user = (p.get("username") if request.method == "POST" else self.username) or ""
        if not approve:
            raise back(error="access_denied", error_description="the user denied access")
        if not user:
            return web.Response(text=self._consent_page(p, client), content_type="text/html")
        code = "code_" + secrets.token_urlsafe(24)
        self.codes[code] = IssuedCode(
            code=code, client_id=client.client_id, redirect_uri=redirect_uri,
            redirect_uri_sent="redirect_uri" in p, subject=user, scopes=scopes,
            code_challenge=p.get("code_challenge"),
            code_challenge_method=p.get("code_challenge_method"),
            nonce=p.get("nonce"), expires_at=self.clock() + self.code_ttl)
        raise back(code=code)

    def _consent_page(self, p: Mapping[str, str], client: RegisteredClient) -> str:
        hidden = "\n".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in p.items() if k not in ("username", "action"))
        return f"""<!doctype html><html><head><title>Fake login</title></head><body>
<h1>Sign in to the fake provider</h1>
<p><b>{html.escape(client.client_id)}</b> asks for: {html.escape(p.get("scope", "(none)"))}</p>
<form method="post" action="/authorize">
{hidden}
<label for="username">Username</label>
<input id="username" name="username" value="{html.escape(self.username)}">
<button id="approve" type="submit" name="action" value="approve">Approve</button>
<button id="deny" type="submit" name="action" value="deny">Deny</button>
</form></body></html>"""

    # ------------------------------------------------------------------ /token

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form: dict[str, str] = {}
        try:
            form = await self._form(request)
        except _Reject as e:
            self._hit("token", request, form)
            return self._error(e)
        self._hit("token", request, form)
        await self.token_delay.wait()
        failed = self._failure("token")
        if failed is not None:
            return failed
        grant = form.get("grant_type", "")
        self.grants[grant] += 1
        try:
            client = self._authenticate(request, form)
            if grant == "authorization_code":
                body = self._code_grant(client, form)
                if self.nest_tokens_under is not None:  # Slack's oauth.v2.access shape
                    body = {"ok": True, "access_token": "decoy-bot-" + secrets.token_hex(8),
                            "token_type": "bot", self.nest_tokens_under: body}
                return self._reply(body)
            if grant == "refresh_token":
                return self._reply(self._refresh_grant(client, form))
            if grant == "client_credentials":
                if client.auth_method == "none":
                    raise _Reject("unauthorized_client", "public clients cannot use this grant")
                scopes = tuple(s for s in form.get("scope", "").split(self.scope_separator) if s)
                return self._reply(self._grant(client.client_id, client.client_id, scopes,
                                               refresh=False))
            raise _Reject("unsupported_grant_type", "grant type not supported")
        except _Reject as e:
            return self._error(e)

    def _code_grant(self, client: RegisteredClient, form: Mapping[str, str]) -> dict[str, Any]:
        rec = self.codes.get(form.get("code", ""))
        if rec is None or rec.client_id != client.client_id:
            raise _Reject("invalid_grant", "unknown authorization code")
        if rec.used:  # §4.1.2: a replayed code revokes what it issued
            for t in rec.issued:
                self.revoke_token(t)
            raise _Reject("invalid_grant", "authorization code already used")
        rec.used = True  # burnt by any attempt, successful or not
        if self.clock() >= rec.expires_at:
            raise _Reject("invalid_grant", "authorization code expired")
        sent = form.get("redirect_uri")
        if (rec.redirect_uri_sent or sent is not None) and sent != rec.redirect_uri:
            raise _Reject("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier")
        if rec.code_challenge is not None:
            if verifier is None or not _VERIFIER.match(verifier):
                raise _Reject("invalid_grant", "missing or malformed code_verifier")
            digest = hashlib.sha256(verifier.encode("ascii")).digest()
            if base64.urlsafe_b64encode(digest).decode().rstrip("=") != rec.code_challenge:
                raise _Reject("invalid_grant", "code_verifier does not match code_challenge")
        elif verifier is not None:  # RFC 9700 §2.1.1: PKCE downgrade
            raise _Reject("invalid_grant", "code_verifier without code_challenge")
        body = self._grant(rec.subject, client.client_id, rec.scopes,
                           refresh=self.issue_refresh_tokens, nonce=rec.nonce)
        rec.issued += [body["access_token"], *([body["refresh_token"]]
                                               if "refresh_token" in body else [])]
        return body

    def _refresh_grant(self, client: RegisteredClient, form: Mapping[str, str]) -> dict[str, Any]:
        rt = self.refresh_tokens.get(form.get("refresh_token", ""))
        if rt is None or rt.revoked or rt.client_id != client.client_id:
            raise _Reject("invalid_grant", "refresh token is invalid or revoked")
        now = self.clock()
        in_grace = False
        if rt.used_at is not None:
            if now - rt.used_at > self.refresh_grace:
                if self.reuse_detection:
                    self._revoke_family(rt.family)
                raise _Reject("invalid_grant", "refresh token was already used")
            assert rt.successor is not None
            # Within the grace period: answer with the successor, without rotating again.
            rt, in_grace = self.refresh_tokens[rt.successor], True
        requested = tuple(s for s in form.get("scope", "").split(self.scope_separator) if s)
        if not set(requested) <= set(rt.scopes):
            raise _Reject("invalid_scope", "scope exceeds the original grant")  # §6
        body = self._grant(rt.subject, client.client_id, requested or rt.scopes,
                           refresh=False, family=rt.family)
        if self.omit_refresh_token:
            return body
        if self.rotate_refresh_tokens and not in_grace:
            new = self._new_refresh(rt.subject, client.client_id, rt.scopes, rt.family)
            rt.used_at, rt.successor = now, new.token
            body["refresh_token"] = new.token
        else:
            body["refresh_token"] = rt.token
        return body

    def _new_refresh(self, subject: str, client_id: str, scopes: tuple[str, ...],
                     family: str | None = None) -> RefreshToken:
        rt = RefreshToken("rt_" + secrets.token_urlsafe(24), subject, client_id, scopes,
                          family or secrets.token_hex(8))
        self.refresh_tokens[rt.token] = rt
        return rt

    def _grant(self, subject: str, client_id: str, scopes: tuple[str, ...], *, refresh: bool,
               family: str | None = None, nonce: str | None = None) -> dict[str, Any]:
        """Mint an access token (and a refresh token, id_token) as a §5.1 response body."""
        now = self.clock()
        rt = self._new_refresh(subject, client_id, scopes) if refresh else None
        family = rt.family if rt is not None else family
        at = AccessToken("at_" + secrets.token_urlsafe(24), subject, client_id, scopes,
                         None if self.expires_in is None else now + self.expires_in, family)
        self.access_tokens[at.token] = at
        body: dict[str, Any] = {"access_token": at.token}
        if self.token_type is not None:
            body["token_type"] = self.token_type
        if self.expires_in is not None and self.send_expires_in:
            body["expires_in"] = self.expires_in
        if self.expires_in is not None and self.expires_at_field is not None:
            at_epoch = int(now) + self.expires_in
            body[self.expires_at_field] = at_epoch if self.expires_at_format == "epoch" else (
                datetime.fromtimestamp(at_epoch, UTC).isoformat().replace("+00:00", "Z"))
        if rt is not None:
            body["refresh_token"] = rt.token
        if scopes:
            body["scope"] = " ".join(scopes)
        if "openid" in scopes:
            claims = {"iss": self.issuer_url(), "sub": subject, "aud": client_id,
                      "iat": int(now), "exp": int(now) + 600, "auth_time": int(now)}
            if nonce is not None:
                claims["nonce"] = nonce
            body["id_token"] = self.sign_id_token(claims)
        body.update(self.extra_token_fields)
        return body

    def _revoke_family(self, family: str) -> None:
        items: list[AccessToken | RefreshToken] = [*self.access_tokens.values(),
                                                   *self.refresh_tokens.values()]
        for t in items:
            if t.family == family:
                t.revoked = True

    # ------------------------------------------------------------------ other endpoints

    async def _revoke(self, request: web.Request) -> web.StreamResponse:
        if self.revocation_method != "rfc7009":
            return await self._revoke_grant(request)
        try:
            form = await self._form(request)
        except _Reject as e:
            self._hit("revoke", request, {})
            return self._error(e)
        self._hit("revoke", request, form)
        failed = self._failure("revoke")
        if failed is not None:
            return failed
        try:
            client = self._authenticate(request, form)
            token = form.get("token")
            if not token:
                raise _Reject("invalid_request", "token is required")
        except _Reject as e:
            return self._error(e)
        owner = self.access_tokens.get(token) or self.refresh_tokens.get(token)
        if owner is not None and owner.client_id == client.client_id:  # RFC 7009 §2.1
            self.revoke_token(token)
        return web.Response(status=200)  # §2.2: also for unknown tokens

    async def _revoke_grant(self, request: web.Request) -> web.StreamResponse:
        """The non-RFC revocations: the access token (as Bearer credentials, or as the
        ``access_token`` parameter) revokes its whole grant; no client authentication."""
        if self.revocation_method == "bearer":
            body = await request.read()
            self._hit("revoke", request, {})
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if body or scheme.lower() != "bearer":
                return web.json_response({"ok": False, "error": "invalid_request"})
        else:
            form: dict[str, str] = {}
            try:
                form = await self._form(request)
            except _Reject as e:
                self._hit("revoke", request, form)
                return self._error(e)
            self._hit("revoke", request, form)
            token = form.get("access_token", "")
            if "Authorization" in request.headers or "client_secret" in form:
                return self._error(_Reject("invalid_request", "no client authentication here"))
        failed = self._failure("revoke")
        if failed is not None:
            return failed
        at = self.access_tokens.get(token)
        if at is None or self.is_valid_access_token(token) is None:
            # Slack answers 200 with ok=false; Strava a 401 with a message.
            if self.revocation_method == "bearer":
                return web.json_response({"ok": False, "error": "invalid_auth"})
            return web.json_response({"message": "Authorization Error"}, status=401)
        if at.family is not None:
            self._revoke_family(at.family)
        at.revoked = True
        return web.json_response({"ok": True, "revoked": True})

    async def _userinfo(self, request: web.Request) -> web.StreamResponse:
        self._hit("userinfo", request, {})
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        subject = self.is_valid_access_token(token) if scheme.lower() == "bearer" else None
        if subject is None:
            return web.json_response({"error": "invalid_token"}, status=401, headers={
                "WWW-Authenticate": 'Bearer error="invalid_token"'})
        return web.json_response({"sub": subject, "preferred_username": subject})

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self._hit("jwks", request, {})
        return web.json_response(self.jwks())

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        """OIDC Discovery 1.0 §3 / RFC 8414 §2 metadata."""
        self._hit("discovery", request, {})
        base = self._url or request.url.origin()
        return web.json_response({
            "issuer": self.issuer_url(request),
            "authorization_endpoint": str(base / "authorize"),
            "token_endpoint": str(base / "token"),
            "revocation_endpoint": str(base / "revoke"),
            "userinfo_endpoint": str(base / "userinfo"),
            "jwks_uri": str(base / "jwks"),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token",
                                      "client_credentials"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                      "client_secret_post", "none"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": sorted(self.supported_scopes or {"openid", "profile"}),
        })


async def start_auth_server(aiohttp_server: Callable[..., Any],
                            server: FakeAuthServer | None = None,
                            **knobs: Any) -> FakeAuthServer:
    """Serve a FakeAuthServer (new one built from ``knobs`` unless given) and set ``.url``."""
    fake = server if server is not None else FakeAuthServer(**knobs)
    test_server = await aiohttp_server(fake.app)
    fake.url = URL.build(scheme="http", host=test_server.host, port=test_server.port)
    return fake
