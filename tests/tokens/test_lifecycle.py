"""Table tests for the pure token lifecycle rules (no event loop, injected ``now``)."""

from __future__ import annotations

import math

import pytest

from gateway.oauth.protocol import OAuthError
from gateway.store.base import TokenFields
from gateway.tokens.lifecycle import (
    DEFAULT_RETRY_AFTER,
    Expired,
    Fresh,
    Reconsent,
    RefreshDue,
    Unavailable,
    UseCurrent,
    assess,
    decide_after_refresh_failure,
    effective_skew,
    merge_refresh,
)

T0 = 1_700_000_000.0

# (expires_at, issued_at, now, skew) -> expected
ASSESS_TABLE = [
    # unknown expiry: only the upstream's 401 can tell
    (None, T0, T0 + 10**9, 60, Fresh()),
    (None, None, T0, 0, Fresh()),
    # one-hour token, 60 s skew
    (T0 + 3600, T0, T0, 60, Fresh()),
    (T0 + 3600, T0, T0 + 3539.9, 60, Fresh()),
    (T0 + 3600, T0, T0 + 3540, 60, RefreshDue()),
    (T0 + 3600, T0, T0 + 3599.9, 60, RefreshDue()),
    (T0 + 3600, T0, T0 + 3600, 60, Expired()),
    (T0 + 3600, T0, T0 + 99999, 60, Expired()),
    # skew clamp: a 60 s token with a 60 s skew is refreshed after 30 s, not at once
    (T0 + 60, T0, T0 + 1, 60, Fresh()),
    (T0 + 60, T0, T0 + 29.9, 60, Fresh()),
    (T0 + 60, T0, T0 + 30, 60, RefreshDue()),
    (T0 + 60, T0, T0 + 60, 60, Expired()),
    # a 10 s token with a 300 s skew: due after 5 s
    (T0 + 10, T0, T0 + 4.9, 300, Fresh()),
    (T0 + 10, T0, T0 + 5, 300, RefreshDue()),
    # unknown issue time: plain skew
    (T0 + 60, None, T0 + 1, 60, RefreshDue()),
    (T0 + 120, None, T0 + 59, 60, Fresh()),
    # zero skew: fresh until the very end
    (T0 + 60, T0, T0 + 59.999, 0, Fresh()),
    (T0 + 60, T0, T0 + 60, 0, Expired()),
    # nonsense lifetimes (issued after expiry, zero lifetime) never make a dead token usable
    (T0 + 60, T0 + 100, T0 + 59, 60, Fresh()),
    (T0 + 60, T0 + 100, T0 + 61, 60, Expired()),
    (T0, T0, T0, 60, Expired()),
    # clock stepped back before the issue time: still fresh, not expired
    (T0 + 3600, T0, T0 - 500, 60, Fresh()),
]


@pytest.mark.parametrize(("expires_at", "issued_at", "now", "skew", "expected"), ASSESS_TABLE)
def test_assess_table(expires_at: float | None, issued_at: float | None, now: float,
                      skew: float, expected: object) -> None:
    assert assess(expires_at, issued_at, now, skew) == expected


@pytest.mark.parametrize("skew", [-1.0, math.nan])
def test_assess_rejects_bad_skew(skew: float) -> None:
    with pytest.raises(ValueError, match="skew"):
        assess(T0 + 60, T0, T0, skew)


@pytest.mark.parametrize(("expires_at", "issued_at", "skew", "expected"), [
    (T0 + 3600, T0, 60, 60),
    (T0 + 60, T0, 60, 30),
    (T0 + 1, T0, 60, 0.5),
    (T0 + 60, None, 60, 60),
    (T0 - 10, T0, 60, 0),  # negative lifetime clamps to 0, never a negative skew
])
def test_effective_skew(expires_at: float, issued_at: float | None, skew: float,
                        expected: float) -> None:
    assert effective_skew(expires_at, issued_at, skew) == expected


def test_assessments_are_distinct_values() -> None:
    assert Fresh() != RefreshDue() != Expired() != Fresh()
    assert Fresh() == Fresh()


# --------------------------------------------------------------------------- refresh failures

INVALID_GRANT = OAuthError("invalid_grant", "refresh token revoked", status=400)
SERVER_500 = OAuthError("temporarily_unavailable", status=500, transient=True)
SLOW_DOWN = OAuthError("temporarily_unavailable", status=503, transient=True, retry_after=42.0)
TIMEOUT = OAuthError("timeout", transient=True)
BAD_CLIENT = OAuthError("invalid_client", status=401)
BAD_CLIENT_RETRY = OAuthError("invalid_client", status=401, retry_after=17.0)
BOGUS_RETRY = OAuthError("temporarily_unavailable", status=503, transient=True, retry_after=-3.0)

# (error, current expires_at, now) -> decision
FAILURE_TABLE = [
    # invalid_grant is final whatever the access token's state (caller re-read the store first)
    (INVALID_GRANT, T0 + 3600, T0, Reconsent()),
    (INVALID_GRANT, T0 - 1, T0, Reconsent()),
    (INVALID_GRANT, None, T0, Reconsent()),
    # transient with a token that still works: keep using it
    (SERVER_500, T0 + 30, T0, UseCurrent(DEFAULT_RETRY_AFTER)),
    (TIMEOUT, T0 + 0.001, T0, UseCurrent(DEFAULT_RETRY_AFTER)),
    (SLOW_DOWN, T0 + 30, T0, UseCurrent(42.0)),
    (SERVER_500, None, T0, UseCurrent(DEFAULT_RETRY_AFTER)),
    # transient with a token that really expired: 503 with Retry-After
    (SERVER_500, T0, T0, Unavailable(DEFAULT_RETRY_AFTER)),
    (SERVER_500, T0 - 100, T0, Unavailable(DEFAULT_RETRY_AFTER)),
    (SLOW_DOWN, T0 - 1, T0, Unavailable(42.0)),
    (BOGUS_RETRY, T0 - 1, T0, Unavailable(DEFAULT_RETRY_AFTER)),
    # configuration errors: never destroy tokens, fail visibly now
    (BAD_CLIENT, T0 + 3600, T0, Unavailable(DEFAULT_RETRY_AFTER)),
    (BAD_CLIENT, T0 - 1, T0, Unavailable(DEFAULT_RETRY_AFTER)),
    (BAD_CLIENT_RETRY, None, T0, Unavailable(17.0)),
    (OAuthError("invalid_scope", status=400), T0 + 60, T0, Unavailable(DEFAULT_RETRY_AFTER)),
    (OAuthError("invalid_response", "no access_token", status=200), T0 + 60, T0,
     Unavailable(DEFAULT_RETRY_AFTER)),
]


@pytest.mark.parametrize(("err", "expires_at", "now", "expected"), FAILURE_TABLE)
def test_decide_after_refresh_failure_table(err: OAuthError, expires_at: float | None,
                                            now: float, expected: object) -> None:
    assert decide_after_refresh_failure(err, expires_at, now) == expected


def test_decide_default_retry_after_is_configurable() -> None:
    assert decide_after_refresh_failure(SERVER_500, T0 - 1, T0, default_retry_after=9) \
        == Unavailable(9)


# --------------------------------------------------------------------------- merge

OLD = TokenFields(access_token="old-at", refresh_token="old-rt", expires_at=T0 + 10,
                  scopes=("read", "write"), extra={"instance_url": "https://a.example",
                                                   "keep": "me"})


def test_merge_keeps_old_refresh_token_and_scopes_when_none_returned() -> None:
    merged = merge_refresh(OLD, TokenFields(access_token="new-at", expires_at=T0 + 3600))
    assert merged.access_token == "new-at"
    assert merged.refresh_token == "old-rt"
    assert merged.scopes == ("read", "write")
    assert merged.expires_at == T0 + 3600
    assert merged.extra == OLD.extra


def test_merge_takes_rotated_refresh_token_and_new_scopes() -> None:
    new = TokenFields(access_token="new-at", refresh_token="new-rt", expires_at=T0 + 3600,
                      scopes=("read",), extra={"instance_url": "https://b.example"})
    merged = merge_refresh(OLD, new)
    assert merged.refresh_token == "new-rt"
    assert merged.scopes == ("read",)
    assert merged.extra == {"instance_url": "https://b.example", "keep": "me"}


def test_merge_unknown_new_expiry_stays_unknown() -> None:
    # The old token's expiry says nothing about the new token.
    merged = merge_refresh(OLD, TokenFields(access_token="new-at", expires_at=None))
    assert merged.expires_at is None


def test_merge_empty_refresh_token_string_is_no_refresh_token() -> None:
    merged = merge_refresh(OLD, TokenFields(access_token="new-at", refresh_token=""))
    assert merged.refresh_token == "old-rt"


def test_merge_without_any_refresh_token() -> None:
    old = TokenFields(access_token="a")
    merged = merge_refresh(old, TokenFields(access_token="b"))
    assert merged.refresh_token is None
    assert merged.access_token == "b"
