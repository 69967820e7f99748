"""One test per quirk through the real OAuthClient, against the fake authorization server
set to behave like the provider that needs it. Each also shows that a provider *without*
the quirk fails against that server, so the quirk is what makes it work."""

from __future__ import annotations

import time

import aiohttp

from gateway.oauth.client import OAuthClient
from gateway.oauth.protocol import ASSUMED_LIFETIME, OAuthError, TokenGrant
from tests.fakes.authserver import FakeAuthServer
from tests.quirks.conftest import authorize, exchange

NOW = 1_700_000_000.0


def ok(result: TokenGrant | OAuthError) -> TokenGrant:
    assert isinstance(result, TokenGrant), result
    return result


def bad(result: TokenGrant | OAuthError) -> OAuthError:
    assert isinstance(result, OAuthError), result
    return result


async def test_scope_param(fake: FakeAuthServer, oauth: OAuthClient,
                           session: aiohttp.ClientSession) -> None:
    fake.scope_param = "user_scope"  # Slack: user scopes go in user_scope
    quirky = fake.provider_config(scopes=("users:read", "chat:write"), scope_param="user_scope")
    g = ok(await exchange(session, oauth, quirky, NOW))
    assert g.tokens.scopes == ("users:read", "chat:write")
    assert fake.requests[0].params["user_scope"] == "users:read chat:write"
    refused = await authorize(session, fake.provider_config(scopes=("users:read",)))
    assert refused.query["error"] == "invalid_scope"


async def test_scope_separator(fake: FakeAuthServer, oauth: OAuthClient,
                               session: aiohttp.ClientSession) -> None:
    fake.scope_separator = ","  # Strava, Slack
    quirky = fake.provider_config(scopes=("read", "activity:read"), scope_separator=",")
    assert ok(await exchange(session, oauth, quirky, NOW)).tokens.scopes \
        == ("read", "activity:read")
    # Space-separated, the server sees one scope nobody granted in that form.
    plain = ok(await exchange(session, oauth, fake.provider_config(
        scopes=("read", "activity:read")), NOW))
    assert plain.tokens.scopes == ("read", "activity:read")  # the request, echoed
    assert fake.access_tokens[plain.tokens.access_token].scopes == ("read activity:read",)


async def test_json_token_requests(fake: FakeAuthServer, oauth: OAuthClient,
                                   session: aiohttp.ClientSession) -> None:
    fake.json_requests = True  # Notion, Zendesk
    quirky = fake.provider_config(token_request_format="json", scopes=("read",))
    g = ok(await exchange(session, oauth, quirky, NOW))
    assert g.tokens.refresh_token is not None
    assert fake.requests[-1].headers["Content-Type"] == "application/json"
    r = ok(await oauth.refresh(quirky, g.tokens.refresh_token, scopes=(), now=NOW))
    assert ok(await oauth.client_credentials(quirky, now=NOW)).tokens.access_token
    assert await oauth.revoke(quirky, r.tokens.access_token, "access_token") is None
    assert fake.is_valid_access_token(r.tokens.access_token) is None
    assert fake.grants == {"authorization_code": 1, "refresh_token": 1, "client_credentials": 1}
    err = bad(await exchange(session, oauth, fake.provider_config(scopes=("read",)), NOW))
    assert err.error == "invalid_request" and "application/json" in (err.description or "")


async def test_form_responses_with_a_wrong_content_type(fake: FakeAuthServer,
                                                        oauth: OAuthClient,
                                                        session: aiohttp.ClientSession) -> None:
    fake.form_encoded_responses = True
    fake.form_content_type = "text/html; charset=utf-8"
    quirky = fake.provider_config(token_response_format="form")
    g = ok(await exchange(session, oauth, quirky, NOW))
    assert g.tokens.expires_at == NOW + 3600 and g.tokens.refresh_token
    assert fake.is_valid_access_token(g.tokens.access_token) == "alice"
    rotated = ok(await oauth.refresh(quirky, g.tokens.refresh_token, scopes=(), now=NOW))
    assert rotated.tokens.refresh_token != g.tokens.refresh_token
    err = bad(await oauth.refresh(quirky, g.tokens.refresh_token, scopes=(), now=NOW))
    assert err.invalid_grant  # a form-encoded error is read as one too
    plain = bad(await exchange(session, oauth, fake.provider_config(), NOW))
    assert plain.transient  # an "HTML page" is not a token response


async def test_tokens_nested_in_the_response(fake: FakeAuthServer, oauth: OAuthClient,
                                             session: aiohttp.ClientSession) -> None:
    fake.nest_tokens_under = "authed_user"  # Slack oauth.v2.access
    fake.token_type = "user"
    quirky = fake.provider_config(token_response_path=("authed_user",))
    g = ok(await exchange(session, oauth, quirky, NOW))
    assert fake.is_valid_access_token(g.tokens.access_token) == "alice"
    assert g.tokens.refresh_token is not None
    # Refresh answers are flat (the path is absent): the top level is read.
    r = ok(await oauth.refresh(quirky, g.tokens.refresh_token, scopes=(), now=NOW))
    assert fake.is_valid_access_token(r.tokens.access_token) == "alice"
    # Without the quirk the top-level decoy (a bot token) would be taken: refused.
    err = bad(await exchange(session, oauth, fake.provider_config(), NOW))
    assert err.error == "unsupported_token_type"


async def test_absolute_expiry_epoch_and_iso(fake: FakeAuthServer, oauth: OAuthClient,
                                             session: aiohttp.ClientSession) -> None:
    fake.expires_in, fake.send_expires_in = 21600, False
    fake.expires_at_field = "expires_at"  # Strava
    quirky = fake.provider_config(expires_absolute_field="expires_at")
    for fmt in ("epoch", "iso"):
        fake.expires_at_format = fmt
        before = time.time()
        g = ok(await exchange(session, oauth, quirky, NOW))
        assert g.tokens.expires_at is not None
        assert int(before) + 21600 <= g.tokens.expires_at <= time.time() + 21600
        assert "expires_at" not in g.tokens.extra
    # Without the quirk the absolute member means nothing: the RFC default lifetime applies.
    plain = ok(await exchange(session, oauth, fake.provider_config(), NOW))
    assert plain.tokens.expires_at == NOW + ASSUMED_LIFETIME


async def test_never_expires(fake: FakeAuthServer, oauth: OAuthClient,
                             session: aiohttp.ClientSession) -> None:
    fake.expires_in = None  # Salesforce, Notion: no expires_in, a refresh token anyway
    quirky = fake.provider_config(never_expires=True)
    g = ok(await exchange(session, oauth, quirky, NOW))
    assert g.tokens.expires_at is None and g.tokens.refresh_token is not None
    plain = ok(await exchange(session, oauth, fake.provider_config(), NOW))
    assert plain.tokens.expires_at == NOW + ASSUMED_LIFETIME
    fake.issue_refresh_tokens = False  # GitHub OAuth apps: no refresh token either
    for p in (quirky, fake.provider_config()):
        bare = ok(await exchange(session, oauth, p, NOW))
        assert bare.tokens.expires_at is None and bare.tokens.refresh_token is None


async def test_upstream_from_token_member_is_kept(fake: FakeAuthServer,
                                                  oauth: OAuthClient,
                                                  session: aiohttp.ClientSession) -> None:
    fake.extra_token_fields = {"instance_url": "https://eu7.my.salesforce.example"}
    quirky = fake.provider_config(upstream_from_token="instance_url")
    g = ok(await exchange(session, oauth, quirky, NOW))
    assert g.tokens.extra["instance_url"] == "https://eu7.my.salesforce.example"


async def test_bearer_revocation(fake: FakeAuthServer, oauth: OAuthClient,
                                 session: aiohttp.ClientSession) -> None:
    fake.revocation_method = "bearer"  # Dropbox, Slack
    quirky = fake.provider_config(revocation_method="bearer")
    g = ok(await exchange(session, oauth, quirky, NOW))
    assert g.tokens.refresh_token is not None
    hits = fake.hits["revoke"]
    assert await oauth.revoke(quirky, g.tokens.refresh_token, "refresh_token") is None
    assert fake.hits["revoke"] == hits  # nothing to send for a refresh token
    assert await oauth.revoke(quirky, g.tokens.access_token, "access_token") is None
    assert fake.is_valid_access_token(g.tokens.access_token) is None
    assert fake.is_valid_refresh_token(g.tokens.refresh_token) is None  # the whole grant
    # Revoking it again: Slack says 200 {"ok": false, "error": "invalid_auth"}.
    again = await oauth.revoke(quirky, g.tokens.access_token, "access_token")
    assert again is not None and again.error == "invalid_auth"
    other = ok(await exchange(session, oauth, quirky, NOW))
    plain = await oauth.revoke(fake.provider_config(), other.tokens.access_token, "access_token")
    assert plain is not None and plain.error == "invalid_request"
    assert fake.is_valid_access_token(other.tokens.access_token) == "alice"


async def test_access_token_param_revocation(fake: FakeAuthServer, oauth: OAuthClient,
                                             session: aiohttp.ClientSession) -> None:
    fake.revocation_method = "access_token_param"  # Strava deauthorize
    quirky = fake.provider_config(revocation_method="access_token_param",
                                  client_auth="client_secret_basic")
    g = ok(await exchange(session, oauth, quirky, NOW))
    assert await oauth.revoke(quirky, g.tokens.access_token, "access_token") is None
    assert fake.is_valid_refresh_token(g.tokens.refresh_token or "") is None
    assert fake.requests[-1].params == {"access_token": g.tokens.access_token}
    assert "Authorization" not in fake.requests[-1].headers
    err = await oauth.revoke(quirky, g.tokens.access_token, "access_token")
    assert err is not None and err.status == 401  # a dead token is not revoked twice
