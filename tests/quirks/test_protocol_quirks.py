"""Each quirk in the pure protocol layer: requests built and responses read as the provider's
options say, and exactly the RFC behaviour when an option is left at its default."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from yarl import URL

from gateway.config import ProviderConfig
from gateway.oauth.protocol import (
    ASSUMED_LIFETIME,
    STANDARD,
    OAuthError,
    ResponseQuirks,
    TokenGrant,
    authorize_url,
    client_credentials_request,
    code_request,
    parse_revocation_response,
    parse_token_response,
    refresh_request,
    revocation_request,
)

NOW = 1_700_000_000.0
JSON = "application/json"


def provider(**kw: Any) -> ProviderConfig:
    base: dict[str, Any] = {
        "name": "p", "authorize_url": URL("https://as.example/authorize"),
        "token_url": URL("https://as.example/token"),
        "revocation_url": URL("https://as.example/revoke"),
        "client_id": "cid", "client_secret": "csecret",
    }
    return ProviderConfig(**{**base, **kw})


def parse(body: dict[str, Any] | bytes, quirks: ResponseQuirks = STANDARD, *,
          ctype: str | None = JSON, status: int = 200) -> TokenGrant | OAuthError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_token_response(status, ctype, raw, requested_scopes=("req",), now=NOW,
                                quirks=quirks)


def grant(body: dict[str, Any] | bytes, quirks: ResponseQuirks = STANDARD,
          **kw: Any) -> TokenGrant:
    got = parse(body, quirks, **kw)
    assert isinstance(got, TokenGrant), got
    return got


def failure(body: dict[str, Any] | bytes, quirks: ResponseQuirks = STANDARD,
            **kw: Any) -> OAuthError:
    got = parse(body, quirks, **kw)
    assert isinstance(got, OAuthError), got
    return got


# --------------------------------------------------------------------------- request side


def test_scope_param_and_separator_in_the_authorize_request() -> None:
    p = provider(scopes=("users:read", "chat:write"), scope_param="user_scope",
                 scope_separator=",",
                 authorize_params={"user_scope": "admin", "scope": "bot", "team": "T1"})
    q = dict(parse_qsl(urlsplit(authorize_url(p, redirect_uri="https://gw/cb", state="s",
                                               code_challenge=None)).query))
    assert q["user_scope"] == "users:read,chat:write"  # authorize_params cannot override it
    assert "scope" not in q and q["team"] == "T1"
    standard = dict(parse_qsl(urlsplit(authorize_url(
        provider(scopes=("a", "b")), redirect_uri="https://gw/cb", state="s",
        code_challenge=None)).query))
    assert standard["scope"] == "a b" and "user_scope" not in standard


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post"])
def test_json_token_requests(auth: str) -> None:
    p = provider(token_request_format="json", client_auth=auth, scopes=("x",))
    for req in (code_request(p, "c", "https://gw/cb", None), refresh_request(p, "rt"),
                client_credentials_request(p)):
        assert req.headers["Content-Type"] == JSON and req.encoding == "json"
        body = req.body()
        assert body is not None and json.loads(body) == dict(req.form)
    revoke = revocation_request(p, "tok", "access_token")
    assert revoke is not None and revoke.headers["Content-Type"] == JSON
    assert json.loads(revoke.body() or b"") == dict(revoke.form)
    assert revoke.form["token"] == "tok"
    form = code_request(provider(), "c", "https://gw/cb", None)
    assert form.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert dict(parse_qsl((form.body() or b"").decode())) == dict(form.form)


def test_bearer_revocation_sends_the_access_token_and_nothing_else() -> None:
    p = provider(revocation_method="bearer", client_auth="client_secret_post")
    req = revocation_request(p, "AT-1", "access_token")
    assert req is not None and req.url == "https://as.example/revoke"
    assert req.headers["Authorization"] == "Bearer AT-1"
    assert req.body() is None and "Content-Type" not in req.headers
    assert not req.form  # no client_id / client_secret: the token authenticates itself
    assert "AT-1" in req.secret_values()
    assert revocation_request(p, "RT-1", "refresh_token") is None  # revoked with the grant


def test_access_token_param_revocation() -> None:
    p = provider(revocation_method="access_token_param")
    req = revocation_request(p, "AT-1")
    assert req is not None and dict(req.form) == {"access_token": "AT-1"}
    assert "Authorization" not in req.headers
    assert dict(parse_qsl((req.body() or b"").decode())) == {"access_token": "AT-1"}
    assert revocation_request(p, "RT-1", "refresh_token") is None


def test_rfc7009_revocation_is_the_default() -> None:
    req = revocation_request(provider(), "RT-1", "refresh_token")
    assert req is not None and dict(req.form) == {"token": "RT-1",
                                                  "token_type_hint": "refresh_token"}
    assert req.headers["Authorization"].startswith("Basic ")


def test_revocation_errors_on_200_are_errors() -> None:
    err = parse_revocation_response(200, JSON, b'{"ok":false,"error":"invalid_auth"}', now=NOW)
    assert err is not None and err.error == "invalid_auth" and not err.transient
    assert parse_revocation_response(200, JSON, b'{"ok":true}', now=NOW) is None


# --------------------------------------------------------------------------- response format


@pytest.mark.parametrize("ctype", ["text/html", JSON, "application/octet-stream", None])
def test_form_responses_whatever_the_content_type(ctype: str | None) -> None:
    body = b"access_token=a%2Bb&token_type=bearer&expires_in=60&refresh_token=r"
    g = grant(body, ResponseQuirks(format="form"), ctype=ctype)
    assert (g.tokens.access_token, g.tokens.refresh_token) == ("a+b", "r")
    assert g.tokens.expires_at == NOW + 60
    err = failure(b"error=invalid_grant", ResponseQuirks(format="form"), ctype="text/html",
                  status=400)
    assert err.invalid_grant


@pytest.mark.parametrize("ctype", ["text/html", "application/octet-stream"])
def test_standard_format_does_not_guess_a_mislabelled_form(ctype: str) -> None:
    err = failure(b"access_token=a&token_type=bearer", ctype=ctype)
    assert err.transient and err.error == "temporarily_unavailable"


def test_form_format_still_refuses_pages_that_are_not_token_responses() -> None:
    err = failure(b'<html><a href="x">login</a></html>', ResponseQuirks(format="form"),
                  ctype="text/html")
    assert err.transient
    assert grant({"access_token": "j"}, ResponseQuirks(format="form")).tokens.access_token == "j"


# --------------------------------------------------------------------------- nested tokens

SLACK = ResponseQuirks(path=("authed_user",), never_expires=True)


def test_tokens_nested_in_the_response() -> None:
    g = grant({"ok": True, "access_token": "xoxb-bot", "token_type": "bot",
               "authed_user": {"id": "U1", "access_token": "xoxp-user", "token_type": "user",
                               "scope": "users:read,chat:write", "refresh_token": "xoxe-1",
                               "expires_in": 43200}}, SLACK)
    t = g.tokens
    assert (t.access_token, t.refresh_token) == ("xoxp-user", "xoxe-1")
    assert t.scopes == ("users:read", "chat:write") and t.expires_at == NOW + 43200
    assert t.token_type == "Bearer" and dict(t.extra) == {"id": "U1"}
    # Without the quirk the same answer yields the bot token's type, which is refused.
    assert failure({"access_token": "xoxb-bot", "token_type": "bot",
                    "authed_user": {"access_token": "xoxp-user"}}).error \
        == "unsupported_token_type"


def test_nested_path_absent_falls_back_to_the_top_level() -> None:
    g = grant({"ok": True, "access_token": "xoxe.xoxp-2", "token_type": "user",
               "refresh_token": "xoxe-2", "expires_in": 43200}, SLACK)
    assert g.tokens.access_token == "xoxe.xoxp-2" and g.tokens.refresh_token == "xoxe-2"


@pytest.mark.parametrize(("body", "why"), [
    ({"access_token": "bot", "authed_user": {"id": "U1"}}, "no access_token (looked in"),
    ({"access_token": "bot", "authed_user": "U1"}, "no access_token (looked in"),
    ({"authed_user": {"access_token": "u", "token_type": "mac"}}, "is not Bearer"),
    ({"authed_user": {"access_token": "u", "token_type": "DPoP"}}, "is not Bearer"),
])
def test_nested_path_problems(body: dict[str, Any], why: str) -> None:
    err = failure(body, SLACK)
    assert not err.transient and err.description is not None and why in err.description
    assert "bot" not in err.description


def test_deeper_paths_and_top_level_errors() -> None:
    deep = ResponseQuirks(path=("data", "token"))
    assert grant({"data": {"token": {"access_token": "d"}}}, deep).tokens.access_token == "d"
    assert grant({"access_token": "top"}, deep).tokens.access_token == "top"
    assert failure({"data": {"other": 1}}, deep).error == "invalid_response"
    assert failure({"ok": False, "error": "invalid_code"}, SLACK).error == "invalid_code"


# --------------------------------------------------------------------------- expiry

STRAVA = ResponseQuirks(expires_absolute_field="expires_at")


@pytest.mark.parametrize(("value", "expected"), [
    (NOW + 21600, NOW + 21600),
    (str(int(NOW) + 600), NOW + 600),
    ("2023-11-14T22:13:20Z", NOW),
    ("2023-11-14T23:13:20+01:00", NOW),
    ("2023-11-14T22:23:20", NOW + 600),  # no offset: UTC
    (NOW - 100, NOW),  # already past: expired now, not in the past
])
def test_absolute_expiry(value: Any, expected: float) -> None:
    g = grant({"access_token": "a", "expires_at": value, "expires_in": 5}, STRAVA)
    assert g.tokens.expires_at == expected
    assert "expires_at" not in g.tokens.extra


@pytest.mark.parametrize("value", [None, "soon", "", True, 0, -5, {"t": 1}])
def test_unusable_absolute_expiry_falls_back_to_expires_in(value: Any) -> None:
    body: dict[str, Any] = {"access_token": "a", "expires_in": 30}
    if value is not None:
        body["expires_at"] = value
    assert grant(body, STRAVA).tokens.expires_at == NOW + 30


def test_absolute_expiry_is_ignored_without_the_quirk() -> None:
    assert grant({"access_token": "a", "expires_at": NOW + 99, "expires_in": 30}
                 ).tokens.expires_at == NOW + 30


@pytest.mark.parametrize(("body", "never", "expected"), [
    ({"refresh_token": "r"}, False, NOW + ASSUMED_LIFETIME),  # RFC default: refresh in time
    ({"refresh_token": "r"}, True, None),  # used until the upstream answers 401
    ({}, False, None),  # nothing to refresh with: the expiry stays unknown
    ({}, True, None),
    ({"refresh_token": "r", "expires_in": 60}, True, NOW + 60),  # a stated lifetime wins
    ({"expires_in": 60}, False, NOW + 60),
])
def test_never_expires(body: dict[str, Any], never: bool, expected: float | None) -> None:
    g = grant({"access_token": "a", **body}, ResponseQuirks(never_expires=never))
    assert g.tokens.expires_at == expected


def test_quirks_of_a_provider() -> None:
    p = provider(token_response_format="form", token_response_path=("a", "b"),
                 expires_absolute_field="exp", never_expires=True)
    assert ResponseQuirks.of(p) == ResponseQuirks("form", ("a", "b"), "exp", True)
    assert ResponseQuirks.of(provider()) == STANDARD
