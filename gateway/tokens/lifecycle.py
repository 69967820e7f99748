"""Token lifecycle decisions: pure functions of stored facts and an injected ``now``.

No I/O and no event loop here (the shape of h11's ``_state.py``): the token manager asks
these functions *what* to do and does the I/O itself, so every rule below is table-tested.

* :func:`assess` — is an access token ``Fresh``, ``RefreshDue`` (inside the refresh skew
  before expiry) or ``Expired``? The effective skew is clamped to half the token's lifetime
  (SPEC invariant 5), so a 60 s token with a 60 s skew is refreshed after 30 s, not on every
  request.
* :func:`decide_after_refresh_failure` — after the token endpoint refused or failed a
  refresh (RFC 6749 §5.2), keep using the current token, ask for re-consent, or report the
  token endpoint unavailable. Stored tokens are never destroyed here (SPEC invariant 6).
* :func:`merge_refresh` — combine the stored tokens with a refresh response (RFC 6749 §6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.oauth.protocol import OAuthError
from gateway.store.base import TokenFields

DEFAULT_RETRY_AFTER = 5.0


# --------------------------------------------------------------------------- assess


@dataclass(frozen=True, slots=True)
class Fresh:
    """Use the token as it is."""


@dataclass(frozen=True, slots=True)
class RefreshDue:
    """Still valid, but within the (clamped) skew of expiry: refresh before using it."""


@dataclass(frozen=True, slots=True)
class Expired:
    """Past its expiry: it must not be sent upstream; refresh or fail."""


Assessment = Fresh | RefreshDue | Expired


def effective_skew(expires_at: float, issued_at: float | None, skew: float) -> float:
    """``skew``, but never more than half the token's lifetime (when the lifetime is known)."""
    if issued_at is None:
        return skew
    lifetime = expires_at - issued_at
    return max(0.0, min(skew, lifetime / 2))


def assess(expires_at: float | None, issued_at: float | None, now: float,
           skew: float) -> Assessment:
    """Classify an access token at ``now``.

    ``issued_at`` is when *we* stored or refreshed the token (not a claim from the provider),
    so ``expires_at - issued_at`` is the lifetime we were given. An unknown expiry
    (``expires_in`` omitted, RFC 6749 §5.1) is ``Fresh``: the upstream's 401 is then the only
    signal, handled by the manager's ``rejected``.
    """
    if math.isnan(skew) or skew < 0:
        raise ValueError("skew must be a non-negative number of seconds")
    if expires_at is None:
        return Fresh()
    if now >= expires_at:
        return Expired()
    if now >= expires_at - effective_skew(expires_at, issued_at, skew):
        return RefreshDue()
    return Fresh()


# --------------------------------------------------------------------------- refresh failure


@dataclass(frozen=True, slots=True)
class UseCurrent:
    """Keep serving the stored access token (it has not expired); try again after
    ``retry_after`` seconds rather than on every request."""

    retry_after: float = DEFAULT_RETRY_AFTER


@dataclass(frozen=True, slots=True)
class Reconsent:
    """The refresh token is dead: mark the connection ``reconsent_required``."""


@dataclass(frozen=True, slots=True)
class Unavailable:
    """No usable token now; answer 503 ``token_endpoint_unavailable`` with Retry-After."""

    retry_after: float = DEFAULT_RETRY_AFTER


FailureDecision = UseCurrent | Reconsent | Unavailable


def decide_after_refresh_failure(err: OAuthError, current_expires_at: float | None, now: float,
                                 *, default_retry_after: float = DEFAULT_RETRY_AFTER,
                                 ) -> FailureDecision:
    """What to do when a refresh failed with ``err``.

    * ``invalid_grant`` (RFC 6749 §5.2: the refresh token is invalid, expired or revoked)
      → :class:`Reconsent`. The caller must only act on this after re-reading the store
      under the refresh lock and finding the *same* version it refreshed with: another
      process may have rotated the refresh token a moment earlier, and the one we sent was
      merely superseded (SPEC invariant 5).
    * transient (5xx, 429, timeout, network) → :class:`UseCurrent` while the stored access
      token has not really expired (the skew is a margin, not a deadline), else
      :class:`Unavailable`.
    * any other error (``invalid_client``, ``unauthorized_client``, ``invalid_scope``,
      a malformed response…) → :class:`Unavailable`, even if the current token is still
      valid. Such an error is about the gateway's client configuration, not the user's grant:
      the tokens are kept so fixing the config recovers without re-consent, and failing at
      once makes the misconfiguration visible instead of hiding it until the token expires.

    The Retry-After is the server's (RFC 6585 §4 / RFC 9110 §10.2.3) when it sent one.
    """
    retry_after = default_retry_after
    if err.retry_after is not None and err.retry_after > 0:
        retry_after = err.retry_after
    if err.invalid_grant:
        return Reconsent()
    if err.transient and (current_expires_at is None or now < current_expires_at):
        return UseCurrent(retry_after)
    return Unavailable(retry_after)


# --------------------------------------------------------------------------- merge


def merge_refresh(old: TokenFields, new: TokenFields) -> TokenFields:
    """The tokens to store after a successful refresh.

    RFC 6749 §6: the server *may* issue a new refresh token; when it does not, the old one
    stays valid and is kept. §5.1/§3.3: an omitted ``scope`` means the granted scope is
    unchanged. Provider extras (e.g. ``instance_url``) not repeated in the refresh response
    are kept; repeated ones are replaced. ``expires_at`` is taken from the response as is:
    ``None`` there means the new token's lifetime is unknown, not the old token's.
    """
    return TokenFields(
        access_token=new.access_token,
        refresh_token=new.refresh_token if new.refresh_token else old.refresh_token,
        token_type=new.token_type or old.token_type,
        expires_at=new.expires_at,
        scopes=new.scopes if new.scopes else old.scopes,
        extra={**old.extra, **new.extra},
    )
