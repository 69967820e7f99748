"""Pure protocol functions: no server, no event loop."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import pytest
from yarl import URL

from gateway.config import ProviderConfig
from gateway.errors import ConfigError
from gateway.oauth.protocol import (
    OAuthError,
    TokenGrant,
    authorize_url,
    basic_credentials,
    client_credentials_request,
    code_request,
    new_nonce,
    new_pkce,
    new_state,
    parse_retry_after,
    parse_revocation_response,
    parse_token_response,
    refresh_request,
    revocation_request,
    s256_challenge,
)

NOW = 1_700_000_000.0


def provider(**kw: Any) -> ProviderConfig:
    base: dict[str, Any] = {
        "name": "p", "authorize_url": URL("https://as.example/authorize"),
        "token_url": URL("https://as.example/token"),
        "revocation_url": URL("https://as.example/revoke"),
        "client_id": "cid", "client_secret": "csecret",
    }
    base.update(kw)
    return ProviderConfig(**base)


def query(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


# --------------------------------------------------------------------------- randomness


def test_state_and_nonce_are_long_urlsafe_and_unique() -> None:
    for make in (new_state, new_nonce):
        values = {make() for _ in range(50)}
        assert len(values) == 50
        for v in values:
            assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", v)  # >= 256 bits in base64url


def test_pkce_pair_is_valid() -> None:
    verifier, challenge = new_pkce()
    assert re.fullmatch(r"[A-Za-z0-9\-._~]{43,128}", verifier)  # RFC 7636 §4.1
    assert challenge == s256_challenge(verifier)
    assert len(challenge) == 43 and "=" not in challenge
    assert new_pkce()[0] != verifier


def test_pkce_known_answer_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


# --------------------------------------------------------------------------- authorize URL


@pytest.mark.parametrize(("kw", "expected"), [
    ({"scopes": ("read", "write")}, [("scope", "read write")]),
    ({"scopes": ("read", "write"), "scope_separator": ","}, [("scope", "read,write")]),
    ({"scopes": ("a",), "scope_separator": "+"}, [("scope", "a")]),
    ({"scopes": ()}, []),
])
def test_authorize_url_scope(kw: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    url = authorize_url(provider(**kw), redirect_uri="https://gw/cb", state="st",
                        code_challenge="c" * 43)
    assert [p for p in query(url) if p[0] == "scope"] == expected


def test_authorize_url_full_parameter_order_and_encoding() -> None:
    p = provider(scopes=("openid", "email"), authorize_params={"prompt": "consent",
                                                               "access_type": "offline"})
    url = authorize_url(p, redirect_uri="https://gw.example/_gateway/callback?x=1",
                        state="s t&ate", code_challenge="C" * 43, nonce="n1")
    assert url.startswith("https://as.example/authorize?response_type=code&")
    assert " " not in url and "scope=openid%20email" in url
    assert query(url) == [
        ("response_type", "code"), ("client_id", "cid"),
        ("redirect_uri", "https://gw.example/_gateway/callback?x=1"), ("scope", "openid email"),
        ("state", "s t&ate"), ("code_challenge", "C" * 43), ("code_challenge_method", "S256"),
        ("nonce", "n1"), ("prompt", "consent"), ("access_type", "offline"),
    ]


def test_authorize_url_without_pkce_when_provider_disallows_it() -> None:
    url = authorize_url(provider(pkce=False), redirect_uri="https://gw/cb", state="s",
                        code_challenge="C" * 43)
    names = [k for k, _ in query(url)]
    assert "code_challenge" not in names and "code_challenge_method" not in names
    url = authorize_url(provider(), redirect_uri="https://gw/cb", state="s", code_challenge=None)
    assert "code_challenge" not in url


def test_authorize_params_cannot_override_protocol_parameters() -> None:
    p = provider(authorize_params={"response_type": "token", "client_id": "evil", "x": "1"})
    q = query(authorize_url(p, redirect_uri="https://gw/cb", state="s", code_challenge=None))
    assert q.count(("response_type", "code")) == 1 and ("response_type", "token") not in q
    assert [v for k, v in q if k == "client_id"] == ["cid"]
    assert ("x", "1") in q


@pytest.mark.parametrize(("base", "prefix"), [
    ("https://as.example/auth?tenant=a%20b&x=", "https://as.example/auth?tenant=a%20b&x=&"),
    ("https://as.example/auth?", "https://as.example/auth?response_type"),
    ("https://as.example/auth", "https://as.example/auth?response_type"),
])
def test_authorize_url_keeps_existing_query(base: str, prefix: str) -> None:
    p = provider(authorize_url=URL(base, encoded=True))
    url = authorize_url(p, redirect_uri="https://gw/cb", state="s", code_challenge=None)
    assert url.startswith(prefix)


def test_missing_endpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="authorize_url"):
        authorize_url(provider(authorize_url=None), redirect_uri="x", state="s",
                      code_challenge=None)
    with pytest.raises(ConfigError, match="token_url"):
        refresh_request(provider(token_url=None), "rt")
    with pytest.raises(ConfigError, match="revocation_url"):
        revocation_request(provider(revocation_url=None), "t")


# --------------------------------------------------------------------------- client auth


@pytest.mark.parametrize(("cid", "secret", "encoded"), [
    ("cid", "secret", "cid:secret"),
    ("my:client", "p:w", "my%3Aclient:p%3Aw"),
    ("a+b", "c+d", "a%2Bb:c%2Bd"),
    ("with space", "s p", "with+space:s+p"),
    ("100%", "%41", "100%25:%2541"),
    ("ü/é", "&=?", "%C3%BC%2F%C3%A9:%26%3D%3F"),
])
def test_basic_credentials_form_encode_before_base64(cid: str, secret: str, encoded: str) -> None:
    header = basic_credentials(cid, secret)
    scheme, _, b64 = header.partition(" ")
    assert scheme == "Basic"
    raw = base64.b64decode(b64).decode()
    assert raw == encoded
    got_id, _, got_secret = raw.partition(":")  # the first ':' splits: ids' ':' are encoded
    assert (unquote_plus(got_id), unquote_plus(got_secret)) == (cid, secret)


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post", "none"])
def test_code_request_client_auth(method: str) -> None:
    p = provider(client_auth=method, token_params={"audience": "api", "grant_type": "evil"})
    req = code_request(p, "the-code", "https://gw/cb", "v" * 43)
    assert req.url == "https://as.example/token"
    assert req.headers["Accept"] == "application/json"
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert req.form["grant_type"] == "authorization_code"  # token_params cannot override
    assert req.form["code"] == "the-code" and req.form["code_verifier"] == "v" * 43
    assert req.form["redirect_uri"] == "https://gw/cb" and req.form["audience"] == "api"
    if method == "client_secret_basic":
        assert req.headers["Authorization"] == basic_credentials("cid", "csecret")
        assert "client_id" not in req.form and "client_secret" not in req.form
    elif method == "client_secret_post":
        assert "Authorization" not in req.headers
        assert (req.form["client_id"], req.form["client_secret"]) == ("cid", "csecret")
    else:
        assert "Authorization" not in req.headers and "client_secret" not in req.form
        assert req.form["client_id"] == "cid"


def test_request_repr_and_body() -> None:
    req = code_request(provider(client_auth="client_secret_post"), "c0de+/=", "https://gw/cb",
                       None)
    assert "code_verifier" not in req.form
    no_pkce = code_request(provider(pkce=False), "c", "https://gw/cb", "v" * 43)
    assert "code_verifier" not in no_pkce.form
    assert "csecret" not in repr(req) and "c0de" not in repr(req)
    assert dict(parse_qsl(req.body().decode())) == dict(req.form)
    assert set(req.secret_values()) >= {"csecret", "c0de+/="}


@pytest.mark.parametrize(("scopes", "sep", "expected"), [
    ((), " ", None), (("a", "b"), " ", "a b"), (("a", "b"), ",", "a,b"),
])
def test_refresh_request(scopes: tuple[str, ...], sep: str, expected: str | None) -> None:
    req = refresh_request(provider(scope_separator=sep), "rt-1", scopes)
    assert req.form["grant_type"] == "refresh_token" and req.form["refresh_token"] == "rt-1"
    assert req.form.get("scope") == expected


def test_client_credentials_request() -> None:
    req = client_credentials_request(provider(scopes=("x", "y"), client_auth="client_secret_post"))
    assert dict(req.form) == {"grant_type": "client_credentials", "scope": "x y",
                              "client_id": "cid", "client_secret": "csecret"}


def test_revocation_request() -> None:
    p = provider(token_params={"audience": "api"})
    req = revocation_request(p, "tok", "refresh_token")
    assert req.url == "https://as.example/revoke"
    assert dict(req.form) == {"token": "tok", "token_type_hint": "refresh_token"}
    assert req.headers["Authorization"].startswith("Basic ")
    assert "token_type_hint" not in revocation_request(p, "tok").form


# --------------------------------------------------------------------------- parse: success

JSON = "application/json"


def ok(body: dict[str, Any], scopes: tuple[str, ...] = ("req",)) -> TokenGrant:
    got = parse_token_response(200, JSON, json.dumps(body).encode(), requested_scopes=scopes,
                               now=NOW)
    assert isinstance(got, TokenGrant), got
    return got


def test_parse_full_json_response() -> None:
    g = ok({"access_token": "AT-SECRET", "token_type": "Bearer", "expires_in": 3600,
            "refresh_token": "RT-SECRET", "scope": "a b", "id_token": "h.p.s",
            "instance_url": "https://eu1.example", "nested": {"x": 1}, "n": 5})
    t = g.tokens
    assert (t.access_token, t.refresh_token, t.token_type) == ("AT-SECRET", "RT-SECRET", "Bearer")
    assert t.expires_at == NOW + 3600 and t.scopes == ("a", "b")
    assert dict(t.extra) == {"instance_url": "https://eu1.example"}
    assert g.id_token == "h.p.s"
    assert "SECRET" not in repr(g)


@pytest.mark.parametrize(("body", "field", "expected"), [
    ({"token_type": "bearer"}, "token_type", "Bearer"),
    ({"token_type": "BEARER"}, "token_type", "Bearer"),
    ({}, "token_type", "Bearer"),  # missing token_type tolerated
    ({"expires_in": "120"}, "expires_at", NOW + 120),
    ({"expires_in": 1.5}, "expires_at", NOW + 1.5),
    ({}, "expires_at", None),
    ({"expires_in": "soon"}, "expires_at", None),
    ({"expires_in": True}, "expires_at", None),
    ({"expires_in": -5}, "expires_at", NOW),
    ({}, "scopes", ("req",)),
    ({"scope": ""}, "scopes", ("req",)),
    ({"scope": "repo,gist"}, "scopes", ("repo", "gist")),
    ({"scope": ["x", "y"]}, "scopes", ("x", "y")),
    ({}, "refresh_token", None),
    ({"refresh_token": ""}, "refresh_token", None),
])
def test_parse_field_variants(body: dict[str, Any], field: str, expected: Any) -> None:
    g = ok({"access_token": "at", **body})
    assert getattr(g.tokens, field) == expected


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain", None])
def test_parse_form_encoded_body(ctype: str | None) -> None:
    body = b"access_token=a%2Bb&token_type=bearer&scope=repo%2Cgist&expires_in=60"
    g = parse_token_response(200, ctype, body, requested_scopes=(), now=NOW)
    assert isinstance(g, TokenGrant)
    assert g.tokens.access_token == "a+b" and g.tokens.scopes == ("repo", "gist")
    assert g.tokens.expires_at == NOW + 60


def test_json_with_charset_and_vendor_type() -> None:
    for ctype in ("application/json; charset=utf-8", "application/vnd.x+json", "text/javascript"):
        g = parse_token_response(200, ctype, b'{"access_token":"a"}', requested_scopes=(),
                                 now=NOW)
        assert isinstance(g, TokenGrant)


# --------------------------------------------------------------------------- parse: errors


def err(status: int, body: bytes | str, ctype: str | None = JSON,
        retry_after: str | None = None) -> OAuthError:
    raw = body.encode() if isinstance(body, str) else body
    got = parse_token_response(status, ctype, raw, requested_scopes=(), now=NOW,
                               retry_after=retry_after)
    assert isinstance(got, OAuthError), got
    return got


@pytest.mark.parametrize(("status", "body", "ctype", "code", "transient"), [
    (400, '{"error":"invalid_grant","error_description":"expired"}', JSON, "invalid_grant", False),
    (401, '{"error":"invalid_client"}', JSON, "invalid_client", False),
    (400, "error=invalid_grant&error_description=bad", "application/x-www-form-urlencoded",
     "invalid_grant", False),
    (200, '{"error":"bad_verification_code"}', JSON, "bad_verification_code", False),
    (400, '{"error":"unsupported_grant_type"}', "text/plain", "unsupported_grant_type", False),
    (500, '{"error":"server_error"}', JSON, "server_error", True),
    (503, '{"error":"temporarily_unavailable"}', JSON, "temporarily_unavailable", True),
    (429, '{"error":"slow_down"}', JSON, "slow_down", True),
    (502, "<html><body>Bad gateway</body></html>", "text/html", "temporarily_unavailable", True),
    (500, "", None, "temporarily_unavailable", True),
    (200, "<html>login page</html>", "text/html", "temporarily_unavailable", True),
    (200, b"\xff\xfe", JSON, "temporarily_unavailable", True),
    (200, "", JSON, "temporarily_unavailable", True),
    (200, '{"access_token": ', JSON, "temporarily_unavailable", True),
    (200, "[1, 2]", JSON, "temporarily_unavailable", True),
    (404, "Not Found", "text/plain", "temporarily_unavailable", True),
    (400, "<html>oops</html>", "text/html", "temporarily_unavailable", True),
    (302, "", None, "temporarily_unavailable", True),
    (200, '{"token_type":"Bearer"}', JSON, "invalid_response", False),
    (200, '{"access_token":""}', JSON, "invalid_response", False),
    (200, '{"access_token":123}', JSON, "invalid_response", False),
    (200, '{"access_token":"a","token_type":"mac"}', JSON, "unsupported_token_type", False),
    (200, '{"access_token":"a","token_type":7}', JSON, "unsupported_token_type", False),
])
def test_error_shapes(status: int, body: str | bytes, ctype: str | None, code: str,
                      transient: bool) -> None:
    e = err(status, body, ctype)
    assert (e.error, e.transient, e.status) == (code, transient, status)
    assert e.invalid_grant == (code == "invalid_grant")


def test_retry_after_only_on_transient_errors() -> None:
    assert err(503, "", retry_after="7").retry_after == 7.0
    assert err(429, '{"error":"slow_down"}', retry_after="3").retry_after == 3.0
    assert err(400, '{"error":"invalid_grant"}', retry_after="3").retry_after is None
    when = datetime.fromtimestamp(NOW + 30, tz=UTC)
    assert parse_retry_after(format_datetime(when, usegmt=True), NOW) == pytest.approx(30)
    assert parse_retry_after("garbage", NOW) is None
    assert parse_retry_after(None, NOW) is None


def test_error_description_is_clipped_and_cleaned() -> None:
    e = err(400, json.dumps({"error": "invalid_grant\x00\"x",
                             "error_description": "line\r\nbreak " + "A" * 1000}))
    assert e.error == "invalid_grantx"
    assert e.description is not None and len(e.description) <= 200
    assert "\n" not in e.description and "\r" not in e.description
    assert err(400, '{"error":"x","error_description":42}').description is None


def test_redacted_removes_request_secrets() -> None:
    e = err(400, '{"error":"invalid_grant","error_description":"code c0de-123 is bad for csec"}')
    red = e.redacted(["c0de-123", "csec", "ab"])
    assert red.description == "code [redacted] is bad for [redacted]"
    assert red.error == "invalid_grant" and e.redacted(["zzzz"]) is e
    assert "c0de" not in str(red)


def test_error_str_has_no_request_data() -> None:
    e = err(500, "<html>x</html>", "text/html")
    assert str(e) == "temporarily_unavailable (HTTP 500): token endpoint answered HTTP 500"


@pytest.mark.parametrize(("status", "body", "expected"), [
    (200, b"", None),
    (200, b"<html>ignored</html>", None),
    (400, b'{"error":"unsupported_token_type"}', ("unsupported_token_type", False)),
    (503, b"", ("temporarily_unavailable", True)),
    (401, b'{"error":"invalid_client"}', ("invalid_client", False)),
])
def test_parse_revocation_response(status: int, body: bytes,
                                   expected: tuple[str, bool] | None) -> None:
    got = parse_revocation_response(status, JSON, body, now=NOW, retry_after="2")
    if expected is None:
        assert got is None
    else:
        assert got is not None and (got.error, got.transient) == expected
