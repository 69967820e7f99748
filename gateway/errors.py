"""The gateway's one exception hierarchy.

Every error the gateway answers itself is a :class:`GatewayError`; the edge middleware is the
only place that turns one into an HTTP response (JSON body plus a ``Gateway-Error`` header).
Lower layers raise these, or translate foreign exceptions into them at their boundary::

    GatewayError                      500 internal
     ├── BadRequest                   400 bad_request
     ├── Unauthenticated              401 unauthenticated
     ├── ConsentRequired              401 consent_required     (carries connect_url)
     │    └── ReconsentRequired       401 reconsent_required   (refresh token rejected)
     ├── ProviderForbidden            403 provider_forbidden   (client_credentials allowlist)
     ├── UnknownProvider              404 unknown_provider
     ├── UnknownUpstream              404 unknown_upstream     (none of the provider's upstreams)
     ├── MethodNotAllowed             405 method_not_allowed
     ├── PayloadTooLarge              413 payload_too_large
     ├── TooManyRequests              429 rate_limited         (carries Retry-After)
     ├── UpstreamUnreachable          502 upstream_unreachable
     ├── ProviderNotConfigured        503 provider_not_configured (missing secrets or endpoints)
     ├── TokenEndpointUnavailable     503 token_endpoint_unavailable (carries Retry-After)
     ├── UpstreamTimeout              504 upstream_timeout
     ├── StoreUnavailable             503 store_unavailable
     └── ConfigError                  (CLI exit 2; never reaches HTTP)

``OAuthError`` is not a GatewayError: it is a value parsed from an authorization server's
answer (RFC 6749 §5.2), which the token manager decides how to surface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class GatewayError(Exception):
    """Base of every error the gateway reports; knows its HTTP status and stable code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra: dict[str, Any] = dict(extra)

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}

    def headers(self) -> Mapping[str, str]:
        return {"Gateway-Error": self.code}


class BadRequest(GatewayError):
    status, code = 400, "bad_request"


class Unauthenticated(GatewayError):
    status, code = 401, "unauthenticated"

    def headers(self) -> Mapping[str, str]:
        return {**super().headers(), "WWW-Authenticate": 'Bearer realm="gateway"'}


class ConsentRequired(GatewayError):
    """No usable connection for (identity, provider); the body carries a connect link."""

    status, code = 401, "consent_required"

    def __init__(self, message: str, *, provider: str, connect_url: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message, provider=provider, connect_url=connect_url, **extra)


class ReconsentRequired(ConsentRequired):
    code = "reconsent_required"


class ProviderForbidden(GatewayError):
    """The identity is not among a client_credentials provider's ``identities``."""

    status, code = 403, "provider_forbidden"


class UnknownProvider(GatewayError):
    status, code = 404, "unknown_provider"


class UnknownUpstream(GatewayError):
    """The path names none of the provider's ``upstreams`` and it has no default base."""

    status, code = 404, "unknown_upstream"


class ProviderNotConfigured(GatewayError):
    """Configured but not usable yet: missing secrets, endpoints or template variables."""

    status, code = 503, "provider_not_configured"


class MethodNotAllowed(GatewayError):
    status, code = 405, "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class _RetryAfter(GatewayError):
    def __init__(self, message: str, *, retry_after: int = 5, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> Mapping[str, str]:
        return {**super().headers(), "Retry-After": str(self.retry_after)}


class TooManyRequests(_RetryAfter):
    status, code = 429, "rate_limited"


class UpstreamUnreachable(GatewayError):
    status, code = 502, "upstream_unreachable"


class TokenEndpointUnavailable(_RetryAfter):
    status, code = 503, "token_endpoint_unavailable"


class StoreUnavailable(_RetryAfter):
    """``message`` names the database and the cause, for the log and the CLI; a client gets
    :data:`PUBLIC` instead (a file path or a database address is none of its business)."""

    status, code = 503, "store_unavailable"
    PUBLIC: ClassVar[str] = "The gateway's database is unavailable; try again shortly."

    def body(self) -> dict[str, Any]:
        return {**super().body(), "message": self.PUBLIC}


class UpstreamTimeout(GatewayError):
    status, code = 504, "upstream_timeout"


class ConfigError(GatewayError):
    """Invalid configuration; ``path`` names the YAML key at fault (e.g. ``server.port``)."""

    code = "config_error"

    def __init__(self, path: str, problem: str) -> None:
        # A key can be any YAML string: escape what would break the one-line message.
        path = "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


class DecryptionError(GatewayError):
    """A stored secret failed authentication: wrong key, tampering, or a moved ciphertext."""

    code = "decryption_failed"
