"""OAuth 2.0 as pure functions: requests as plain values, responses parsed into values.

Nothing here does I/O or reads a clock: :mod:`gateway.oauth.client` sends what these functions
build, and hands the raw answer back to :func:`parse_token_response`. The shape follows
Authlib's ``rfc6749/parameters.py``: one builder per grant, one parser for every token
endpoint answer, errors as values (:class:`OAuthError`) rather than exceptions, because the
token manager decides what an error means (``invalid_grant`` is final; an unreachable
endpoint is not).

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
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode

from gateway.config import ProviderConfig
from gateway.errors import ConfigError
from gateway.store.base import TokenFields

FORM = "application/x-www-form-urlencoded"
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
    if provider.scopes:
        params.append(("scope", provider.scope_separator.join(provider.scopes)))
    params.append(("state", state))
    if code_challenge is not None and provider.pkce:
        params += [("code_challenge", code_challenge), ("code_challenge_method", "S256")]
    if nonce is not None:
        params.append(("nonce", nonce))
    params += [(k, v) for k, v in provider.authorize_params.items() if k not in _AUTHORIZE_OWNED]
    return _with_query(_endpoint(provider, "authorize_url"), params)


# --------------------------------------------------------------------------- token requests


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """A POST to a token or revocation endpoint, as data (its repr hides the secrets)."""

    url: str
    headers: Mapping[str, str] = field(repr=False)
    form: Mapping[str, str] = field(repr=False)

    def body(self) -> bytes:
        """The ``application/x-www-form-urlencoded`` body (RFC 6749 Appendix B)."""
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
    """Add client authentication (RFC 6749 §2.3) and common headers to ``form``."""
    headers = {"Accept": "application/json", "Content-Type": FORM}
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
    return TokenRequest(url=url, headers=headers, form=form)


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
                       token_type_hint: str | None = None) -> TokenRequest:
    """Token revocation (RFC 7009 §2.1), authenticated like a token request.

    ``token_params`` are not added: they belong to token requests, and a revocation
    endpoint may reject parameters it does not know.
    """
    form = {"token": token}
    if token_type_hint is not None:
        form["token_type_hint"] = token_type_hint
    return _token_request(provider, _endpoint(provider, "revocation_url"), form, extra={})


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


def _decode_body(content_type: str | None, body: bytes) -> dict[str, Any] | None:
    """JSON (the RFC 6749 §5.1 format) or form-encoded (GitHub without Accept, old Facebook);
    ``None`` for anything else (HTML error pages, empty bodies, truncated JSON)."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime in ("text/html", "application/xhtml+xml"):
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
    if data is None and mime in (FORM, "text/plain", ""):
        try:
            pairs = parse_qsl(text.strip(), keep_blank_values=True, strict_parsing=True)
        except ValueError:
            return None
        return dict(pairs) if pairs else None
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


def parse_token_response(status: int, content_type: str | None, body: bytes, *,
                         requested_scopes: tuple[str, ...], now: float,
                         retry_after: str | None = None) -> TokenGrant | OAuthError:
    """Turn a token endpoint answer into a :class:`TokenGrant` or an :class:`OAuthError`."""
    wait = parse_retry_after(retry_after, now)
    data = _decode_body(content_type, body)
    busy = status == 429 or status >= 500
    if data is not None and isinstance(data.get("error"), str) and data["error"]:
        # §5.2 error body; GitHub even sends it with 200.
        return _stated_error(data, status, busy, wait)
    if busy:
        return _unusable(status, f"token endpoint answered HTTP {status}", wait)
    if not 200 <= status < 300:
        return _unusable(status, f"token endpoint answered HTTP {status} without an OAuth "
                                 "error", wait)
    if data is None:
        return _unusable(status, "token endpoint answered with an unreadable body", wait)

    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        return OAuthError("invalid_response", "token response has no access_token", status)
    # §5.1 makes token_type REQUIRED, but some providers omit it; their tokens are bearer
    # tokens in practice, so a missing token_type is read as "Bearer" (RFC 6750).
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        return OAuthError("unsupported_token_type",
                          f"token_type {_clip(str(token_type), 40)!r} is not Bearer", status)
    expires_in = _number(data.get("expires_in"))
    refresh = data.get("refresh_token")
    extra = {k: v for k, v in data.items()
             if k not in _KNOWN and isinstance(v, str) and len(v) <= _EXTRA_MAX_LEN}
    id_token = data.get("id_token")
    tokens = TokenFields(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        expires_at=None if expires_in is None else now + max(0.0, expires_in),
        scopes=_scopes(data.get("scope"), requested_scopes),
        extra=dict(list(extra.items())[:_EXTRA_MAX_FIELDS]),
    )
    return TokenGrant(tokens=tokens,
                      id_token=id_token if isinstance(id_token, str) and id_token else None)


def parse_revocation_response(status: int, content_type: str | None, body: bytes, *,
                              now: float, retry_after: str | None = None) -> OAuthError | None:
    """RFC 7009 §2.2: 200 means revoked (or unknown, which is as good); the body is ignored.
    §2.2.1: 503 asks to retry later; other errors use the §5.2 format."""
    if 200 <= status < 300:
        return None
    wait = parse_retry_after(retry_after, now)
    busy = status == 429 or status >= 500
    data = _decode_body(content_type, body)
    if data is not None and isinstance(data.get("error"), str) and data["error"]:
        return _stated_error(data, status, busy, wait)
    return _unusable(status, f"revocation endpoint answered HTTP {status}", wait)
