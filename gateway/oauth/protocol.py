"""OAuth 2.0 as pure functions: requests as plain values, responses parsed into values.

Nothing here does I/O or reads a clock: :mod:`gateway.oauth.client` sends what these functions
build, and hands the raw answer back to :func:`parse_token_response`. The shape follows
Authlib's ``rfc6749/parameters.py``: one builder per grant, one parser for every token
endpoint answer, errors as values (:class:`OAuthError`) rather than exceptions, because the
token manager decides what an error means (``invalid_grant`` is final; an unreachable
endpoint is not).

Provider quirks (:data:`gateway.oauth.catalog.QUIRKS`) are applied here and only here, as
data read from the :class:`~gateway.config.ProviderConfig`: the scope parameter's name, JSON
request bodies, the revocation method (request side) and the response format, a nested token
object, an absolute expiry and never-expiring tokens (:class:`ResponseQuirks`, response
side). Every default is the RFC behaviour, so a provider without quirks is plain RFC 6749.

Secrets (client secret, code, verifier, tokens) go into :class:`TokenRequest` values and
nowhere else: an :class:`OAuthError` never carries request data, and the provider's own
description is clipped and can be scrubbed of known secrets with :meth:`OAuthError.redacted`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode

from gateway.config import ProviderConfig
from gateway.errors import ConfigError
from gateway.store.base import TokenFields

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
# RFC 6749 §5.1 lets a server omit expires_in and document a default lifetime instead; one
# hour is the commonest. Only a token that came with a refresh token gets it (see _expiry).
ASSUMED_LIFETIME = 3600.0
# Token types that are not bearer tokens (RFC 6749 §7.1 "mac", RFC 9449 DPoP, RFC 8693 N_A):
# sending one as a bearer token would not work, so they are refused even where token_type
# is otherwise read loosely (see ResponseQuirks).
_NOT_BEARER = frozenset({"mac", "dpop", "pop", "n_a"})
_DESCRIPTION_MAX = 200
_EXTRA_MAX_FIELDS = 32
_EXTRA_MAX_LEN = 4096
# RFC 6749 §5.1 members we map to TokenFields ourselves; everything else may go to ``extra``.
_KNOWN = frozenset({"access_token", "refresh_token", "token_type", "expires_in", "scope",
                    "id_token", "error", "error_description", "error_uri"})
# Parameters the protocol owns: configured extras (authorize_params, token_params) never
# override them, so a preset cannot, say, switch response_type or smuggle a second client_id.
_AUTHORIZE_OWNED = frozenset({"response_type", "client_id", "redirect_uri", "scope", "state",
                              "code_challenge", "code_challenge_method", "nonce"})
_TOKEN_OWNED = frozenset({"grant_type", "code", "redirect_uri", "code_verifier", "refresh_token",
                          "client_id", "client_secret", "scope", "token", "token_type_hint"})
# RFC 6749 §5.2: error codes are %x20-21 / %x23-5B / %x5D-7E.
_ERROR_CODE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --------------------------------------------------------------------------- randomness


def new_state() -> str:
    """Opaque CSRF ``state`` (RFC 6749 §10.12): 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def new_nonce() -> str:
    """OIDC ``nonce`` binding the id_token to this authorization request."""
    return secrets.token_urlsafe(32)


def new_pkce() -> tuple[str, str]:
    """A ``(code_verifier, code_challenge)`` pair, method S256.

    RFC 7636 §4.1: the verifier is 43-128 unreserved characters; 64 random bytes give 86
    base64url characters (512 bits). §4.2: challenge = BASE64URL(SHA256(ASCII(verifier))).
    """
    verifier = secrets.token_urlsafe(64)
    return verifier, s256_challenge(verifier)


def s256_challenge(verifier: str) -> str:
    """RFC 7636 §4.2 ``S256`` transformation (base64url without padding)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


# --------------------------------------------------------------------------- authorize


def _endpoint(provider: ProviderConfig, attr: str) -> str:
    url = getattr(provider, attr)
    if url is None:
        raise ConfigError(f"providers.{provider.name}.{attr}", "is not set (nor discovered)")
    return str(url)


def _with_query(url: str, params: Iterable[tuple[str, str]]) -> str:
    """Append ``params`` to ``url`` keeping its existing query byte for byte (RFC 6749 §3.1:
    the endpoint URI MAY include a query component, which MUST be retained)."""
    encoded = urlencode(list(params), quote_via=quote, safe="")
    if not encoded:
        return url
    if "?" not in url:
        return f"{url}?{encoded}"
    return f"{url}{'' if url.endswith(('?', '&')) else '&'}{encoded}"


def authorize_url(provider: ProviderConfig, *, redirect_uri: str, state: str,
                  code_challenge: str | None, nonce: str | None = None) -> str:
    """The authorization request URI (RFC 6749 §4.1.1, RFC 7636 §4.3, OIDC Core §3.1.2.1)."""
    params: list[tuple[str, str]] = [
        ("response_type", "code"),
        ("client_id", provider.client_id),
        ("redirect_uri", redirect_uri),
    ]
    if provider.scopes:  # RFC 6749 §3.3; Slack's user scopes go in `user_scope` (scope_param)
        params.append((provider.scope_param, provider.scope_separator.join(provider.scopes)))
    params.append(("state", state))
    if code_challenge is not None and provider.pkce:
        params += [("code_challenge", code_challenge), ("code_challenge_method", "S256")]
    if nonce is not None:
        params.append(("nonce", nonce))
    owned = _AUTHORIZE_OWNED | {provider.scope_param}
    params += [(k, v) for k, v in provider.authorize_params.items() if k not in owned]
    return _with_query(_endpoint(provider, "authorize_url"), params)


# --------------------------------------------------------------------------- token requests


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """A POST to a token or revocation endpoint, as data (its repr hides the secrets).

    ``encoding`` is how ``form`` becomes the body: ``form`` (RFC 6749 Appendix B), ``json``
    (the ``token_request_format: json`` quirk) or ``none`` (no body at all: bearer-style
    revocation, where the token travels in the Authorization header).
    """

    url: str
    headers: Mapping[str, str] = field(repr=False)
    form: Mapping[str, str] = field(repr=False)
    encoding: str = "form"

    def body(self) -> bytes | None:
        """The request body, or ``None`` when the request has none."""
        if self.encoding == "none":
            return None
        if self.encoding == "json":
            return json.dumps(dict(self.form), separators=(",", ":")).encode("utf-8")
        return urlencode(list(self.form.items())).encode("ascii")

    def secret_values(self) -> tuple[str, ...]:
        """Every value in this request that must never be echoed back (for redaction)."""
        values = [v for k, v in self.form.items() if k not in ("grant_type", "token_type_hint",
                                                               "scope", "redirect_uri")]
        auth = self.headers.get("Authorization")
        if auth:
            values.append(auth.partition(" ")[2])
        return tuple(values)


def basic_credentials(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: form-encode id and secret (Appendix B), THEN base64 ``id:secret``.

    Skipping the form-encoding breaks ids or secrets containing ':' , '+', '%' or spaces.
    """
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def _token_request(provider: ProviderConfig, url: str, form: dict[str, str],
                   *, extra: Mapping[str, str]) -> TokenRequest:
    """Add client authentication (RFC 6749 §2.3) and common headers to ``form``, to be sent
    in the provider's ``token_request_format``."""
    encoding = provider.token_request_format
    headers = {"Accept": JSON, "Content-Type": JSON if encoding == "json" else FORM}
    for k, v in extra.items():
        if k not in _TOKEN_OWNED:
            form[k] = v
    if provider.client_auth == "client_secret_basic":
        headers["Authorization"] = basic_credentials(provider.client_id, provider.client_secret)
    elif provider.client_auth == "client_secret_post":
        form["client_id"] = provider.client_id
        form["client_secret"] = provider.client_secret
    elif provider.client_auth == "none":  # public client: identifies itself (§3.2.1)
        form["client_id"] = provider.client_id
    else:
        raise ConfigError(f"providers.{provider.name}.client_auth",
                          f"unsupported method {provider.client_auth!r}")
    return TokenRequest(url=url, headers=headers, form=form, encoding=encoding)


def code_request(provider: ProviderConfig, code: str, redirect_uri: str,
                 code_verifier: str | None) -> TokenRequest:
    """Access token request for the authorization code grant (RFC 6749 §4.1.3, RFC 7636 §4.5).

    The verifier is dropped when the provider has PKCE off, mirroring :func:`authorize_url`:
    a verifier without a challenge is rejected by strict servers (RFC 9700 §2.1.1).
    """
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    if code_verifier is not None and provider.pkce:
        form["code_verifier"] = code_verifier
    return _token_request(provider, _endpoint(provider, "token_url"), form,
                          extra=provider.token_params)


def refresh_request(provider: ProviderConfig, refresh_token: str,
                    scopes: tuple[str, ...] = ()) -> TokenRequest:
    """Refresh request (RFC 6749 §6); ``scope`` only when given, and never wider than granted."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if scopes:
        form["scope"] = provider.scope_separator.join(scopes)
    return _token_request(provider, _endpoint(provider, "token_url"), form,
                          extra=provider.token_params)


def client_credentials_request(provider: ProviderConfig) -> TokenRequest:
    """Client credentials grant (RFC 6749 §4.4.2)."""
    form = {"grant_type": "client_credentials"}
    if provider.scopes:
        form["scope"] = provider.scope_separator.join(provider.scopes)
    return _token_request(provider, _endpoint(provider, "token_url"), form,
                          extra=provider.token_params)


def revocation_request(provider: ProviderConfig, token: str,
                       token_type_hint: str | None = None) -> TokenRequest | None:
    """Token revocation as the provider's ``revocation_method`` says.

    * ``rfc7009``: POST ``token`` (and ``token_type_hint``), authenticated like a token
      request (RFC 7009 §2.1). ``token_params`` are not added: they belong to token
      requests, and a revocation endpoint may reject parameters it does not know.
    * ``bearer``: POST with the access token as Bearer credentials (RFC 6750 §2.1) and no
      body (Dropbox ``auth/token/revoke``, Slack ``auth.revoke``).
    * ``access_token_param``: POST ``access_token=...`` (Strava ``deauthorize``).

    The last two revoke the whole grant through an access token and take no client
    authentication; a refresh token cannot be revoked that way, so for
    ``token_type_hint="refresh_token"`` the answer is ``None``: nothing to send.
    """
    url = _endpoint(provider, "revocation_url")
    method = provider.revocation_method
    if method == "rfc7009":
        form = {"token": token}
        if token_type_hint is not None:
            form["token_type_hint"] = token_type_hint
        return _token_request(provider, url, form, extra={})
    if method not in ("bearer", "access_token_param"):
        raise ConfigError(f"providers.{provider.name}.revocation_method",
                          f"unsupported method {method!r}")
    if token_type_hint == "refresh_token":  # noqa: S105 (a hint name, not a secret)
        return None
    if method == "bearer":
        return TokenRequest(url=url, headers={"Accept": JSON, "Authorization": f"Bearer {token}"},
                            form={}, encoding="none")
    encoding = provider.token_request_format
    headers = {"Accept": JSON, "Content-Type": JSON if encoding == "json" else FORM}
    return TokenRequest(url=url, headers=headers, form={"access_token": token},
                        encoding=encoding)


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A successful token response (RFC 6749 §5.1)."""

    tokens: TokenFields
    id_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class OAuthError:
    """An error answer (RFC 6749 §5.2) or a failure to get one; never contains request data.

    ``transient`` means "try again later; keep what you have": 5xx, 429, timeouts, bodies
    that are not an OAuth error. Only a stated error from a 4xx (or an error body on 2xx)
    is final.
    """

    error: str
    description: str | None = None
    status: int | None = None
    transient: bool = False
    retry_after: float | None = None

    @property
    def invalid_grant(self) -> bool:
        """The grant (code or refresh token) is invalid, expired, revoked or used (§5.2)."""
        return self.error == "invalid_grant"

    def redacted(self, values: Iterable[str]) -> OAuthError:
        """A copy whose description has every given secret replaced by ``[redacted]``."""
        if not self.description:
            return self
        text = self.description
        for v in sorted({v for v in values if len(v) >= 4}, key=len, reverse=True):
            text = text.replace(v, "[redacted]")
        return self if text == self.description else replace(self, description=text)

    def __str__(self) -> str:
        where = f" (HTTP {self.status})" if self.status is not None else ""
        desc = f": {self.description}" if self.description else ""
        return f"{self.error}{where}{desc}"


def _clip(text: Any, limit: int = _DESCRIPTION_MAX) -> str | None:
    if not isinstance(text, str) or not text.strip():
        return None
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class ResponseQuirks:
    """How one provider's token responses depart from RFC 6749 §5.1; the defaults do not.

    Built from a provider by :meth:`of` (the meaning of each option is documented with
    :data:`gateway.oauth.catalog.QUIRKS`):

    * ``format``: ``json`` and ``auto`` read the body by its Content-Type (JSON, or a body
      labelled form-encoded or plain text); ``form`` reads a form-encoded body whatever its
      Content-Type claims.
    * ``path``: the token members sit in this nested object (Slack: ``authed_user``); when
      the response has no such object (Slack's refresh answers) the top level is read. Such
      providers use ``token_type`` for the kind of principal (``user``, ``bot``), not an
      RFC 6750 scheme, so there any type but a known proof-of-possession one means Bearer.
    * ``expires_absolute_field``: the member holding the absolute expiry (Unix seconds or an
      ISO-8601 time; no offset means UTC), preferred over ``expires_in``.
    * ``never_expires``: without ``expires_in`` the token is used until the upstream answers
      401. Otherwise a token that came with a refresh token is assumed to live
      :data:`ASSUMED_LIFETIME`, so it is refreshed in time like any other; one without a
      refresh token has nothing to be refreshed with, and its expiry stays unknown.
    """

    format: str = "json"
    path: tuple[str, ...] = ()
    expires_absolute_field: str | None = None
    never_expires: bool = False

    @classmethod
    def of(cls, provider: ProviderConfig) -> ResponseQuirks:
        return cls(format=provider.token_response_format, path=provider.token_response_path,
                   expires_absolute_field=provider.expires_absolute_field,
                   never_expires=provider.never_expires)


STANDARD = ResponseQuirks()
_HTML = ("text/html", "application/xhtml+xml")


def _decode_body(content_type: str | None, body: bytes,
                 fmt: str = "json") -> dict[str, Any] | None:
    """JSON (the RFC 6749 §5.1 format) or form-encoded (GitHub without Accept, old Facebook);
    ``None`` for anything else (HTML error pages, empty bodies, truncated JSON).

    With ``fmt="form"`` a form-encoded body is read under any Content-Type, but a body that
    is neither a token nor an error (an HTML page that happens to contain ``=``) is not."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    labelled_form = mime in (FORM, "text/plain", "")
    if mime in _HTML and fmt != "form":
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return data
    if data is None and (labelled_form or fmt == "form"):
        try:
            pairs = dict(parse_qsl(text.strip(), keep_blank_values=True, strict_parsing=True))
        except ValueError:
            return None
        if not labelled_form and not pairs.keys() & {"access_token", "error"}:
            return None
        return pairs or None
    return None


def _number(value: Any) -> float | None:
    """A finite number from a JSON number or a numeric string (some providers send "3600")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date, as seconds from ``now``."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _scopes(value: Any, requested: tuple[str, ...]) -> tuple[str, ...]:
    """RFC 6749 §5.1: scope absent means "as requested". Space-delimited per §3.3; commas are
    split too because several providers (e.g. GitHub) answer ``repo,gist``."""
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    if isinstance(value, str) and value.strip():
        return tuple(s for s in re.split(r"[\s,]+", value) if s)
    return requested


def _stated_error(data: Mapping[str, Any], status: int, transient: bool,
                  retry_after: float | None) -> OAuthError:
    code = _ERROR_CODE.sub("", str(data["error"]))[:64] or "invalid_request"
    return OAuthError(error=code, description=_clip(data.get("error_description")),
                      status=status, transient=transient,
                      retry_after=retry_after if transient else None)


def _unusable(status: int, why: str, retry_after: float | None) -> OAuthError:
    return OAuthError(error="temporarily_unavailable", description=why, status=status,
                      transient=True, retry_after=retry_after)


def _token_object(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The object holding the token members: the one at ``path`` when the response has it,
    else the top level (Slack's refresh answers). A path that leads to something other
    than an object is no token object at all."""
    node: Any = data
    for i, name in enumerate(path):
        if not isinstance(node, dict) or name not in node or node[name] is None:
            return data if i == 0 else None
        node = node[name]
    return node if isinstance(node, dict) else None


def _is_bearer(token_type: Any, loose: bool) -> bool:
    if not isinstance(token_type, str):
        return False
    kind = token_type.strip().lower()
    return kind == "bearer" or (loose and bool(kind) and kind not in _NOT_BEARER)


def _absolute_time(value: Any) -> float | None:
    """Unix seconds (a number or a numeric string) or an ISO-8601 time; ``None`` if neither
    (or not after the epoch)."""
    when = _number(value)
    if when is None and isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        when = moment.timestamp()
    return when if when is not None and when > 0 else None


def _expiry(fields: Mapping[str, Any], quirks: ResponseQuirks, now: float,
            has_refresh: bool) -> float | None:
    """``expires_at`` for a token issued at ``now`` (see :class:`ResponseQuirks`)."""
    if quirks.expires_absolute_field is not None:
        when = _absolute_time(fields.get(quirks.expires_absolute_field))
        if when is not None:
            return max(now, when)
    expires_in = _number(fields.get("expires_in"))
    if expires_in is not None:
        return now + max(0.0, expires_in)
    if has_refresh and not quirks.never_expires:
        return now + ASSUMED_LIFETIME
    return None


def parse_token_response(status: int, content_type: str | None, body: bytes, *,
                         requested_scopes: tuple[str, ...], now: float,
                         retry_after: str | None = None,
                         quirks: ResponseQuirks = STANDARD) -> TokenGrant | OAuthError:
    """Turn a token endpoint answer into a :class:`TokenGrant` or an :class:`OAuthError`,
    reading it as the provider's ``quirks`` say (:meth:`ResponseQuirks.of`)."""
    wait = parse_retry_after(retry_after, now)
    data = _decode_body(content_type, body, quirks.format)
    busy = status == 429 or status >= 500
    if data is not None and isinstance(data.get("error"), str) and data["error"]:
        # §5.2 error body; GitHub (and Slack) even send it with 200.
        return _stated_error(data, status, busy, wait)
    if busy:
        return _unusable(status, f"token endpoint answered HTTP {status}", wait)
    if not 200 <= status < 300:
        return _unusable(status, f"token endpoint answered HTTP {status} without an OAuth "
                                 "error", wait)
    if data is None:
        return _unusable(status, "token endpoint answered with an unreadable body", wait)

    fields = _token_object(data, quirks.path)
    access = None if fields is None else fields.get("access_token")
    if fields is None or not isinstance(access, str) or not access:
        where = f" (looked in {'.'.join(quirks.path)})" if fields is not data else ""
        return OAuthError("invalid_response", f"token response has no access_token{where}",
                          status)
    # §5.1 makes token_type REQUIRED, but some providers omit it; their tokens are bearer
    # tokens in practice, so a missing token_type is read as "Bearer" (RFC 6750).
    token_type = fields.get("token_type", "Bearer")
    if not _is_bearer(token_type, loose=bool(quirks.path)):
        return OAuthError("unsupported_token_type",
                          f"token_type {_clip(str(token_type), 40)!r} is not Bearer", status)
    refresh = fields.get("refresh_token")
    refresh = refresh if isinstance(refresh, str) and refresh else None
    skip = _KNOWN | {quirks.expires_absolute_field}
    extra = {k: v for k, v in fields.items()
             if k not in skip and isinstance(v, str) and len(v) <= _EXTRA_MAX_LEN}
    id_token = fields.get("id_token")
    tokens = TokenFields(
        access_token=access,
        refresh_token=refresh,
        expires_at=_expiry(fields, quirks, now, refresh is not None),
        scopes=_scopes(fields.get("scope"), requested_scopes),
        extra=dict(list(extra.items())[:_EXTRA_MAX_FIELDS]),
    )
    return TokenGrant(tokens=tokens,
                      id_token=id_token if isinstance(id_token, str) and id_token else None)


def parse_revocation_response(status: int, content_type: str | None, body: bytes, *,
                              now: float, retry_after: str | None = None) -> OAuthError | None:
    """RFC 7009 §2.2: 200 means revoked (or unknown, which is as good), unless the body is
    a stated error (Slack's ``auth.revoke`` answers ``200 {"ok": false, "error": ...}``);
    anything else in it is ignored. §2.2.1: 503 asks to retry later; other errors use the
    §5.2 format."""
    data = _decode_body(content_type, body)
    stated = data is not None and isinstance(data.get("error"), str) and bool(data["error"])
    if 200 <= status < 300 and not stated:
        return None
    wait = parse_retry_after(retry_after, now)
    busy = status == 429 or status >= 500
    if data is not None and stated:
        return _stated_error(data, status, busy, wait)
    return _unusable(status, f"revocation endpoint answered HTTP {status}", wait)
