"""Several API bases per provider (``upstreams``), the token's base (``upstream_from_token``)
and the upstream auth scheme: pure table tests plus a property test that a request only ever
reaches one of the provider's allowlisted bases, under its path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.config import ProviderConfig
from gateway.errors import BadRequest
from gateway.proxy.headers import authorization_value
from gateway.proxy.routing import (
    UnknownUpstream,
    UpstreamChoice,
    base_url,
    choose_upstream,
    parse_target,
    upstream_url,
)

GMAIL = URL("https://gmail.googleapis.com/gmail")
DRIVE = URL("https://www.googleapis.com/drive")
SHEETS = URL("https://sheets.googleapis.com")
WWW = URL("https://www.googleapis.com")
NAMED = {"gmail": GMAIL, "drive": DRIVE, "sheets": SHEETS}


def google(**kw: Any) -> ProviderConfig:
    return ProviderConfig(**{"name": "google", "upstream": WWW, "upstreams": NAMED, **kw})


def route(p: ProviderConfig, raw: str, token_base: URL | None = None) -> str:
    choice = choose_upstream(p, parse_target(raw))
    base = base_url(p, choice, token_base)
    assert base is not None
    return str(upstream_url(base, choice.target))


@pytest.mark.parametrize(("raw", "expected", "prefix"), [
    ("/google/gmail/v1/users/me/messages?q=is%3Aunread",
     "https://gmail.googleapis.com/gmail/v1/users/me/messages?q=is%3Aunread", "/google/gmail"),
    ("/google/drive/v3/files", "https://www.googleapis.com/drive/v3/files", "/google/drive"),
    ("/google/sheets/v4/spreadsheets/x", "https://sheets.googleapis.com/v4/spreadsheets/x",
     "/google/sheets"),
    ("/google/gmail", "https://gmail.googleapis.com/gmail", "/google/gmail"),
    ("/google/gmail/", "https://gmail.googleapis.com/gmail/", "/google/gmail"),
    ("/google/gmail?x=1", "https://gmail.googleapis.com/gmail?x=1", "/google/gmail"),
    # Anything else goes to the default base, byte for byte.
    ("/google/oauth2/v3/userinfo", "https://www.googleapis.com/oauth2/v3/userinfo", "/google"),
    ("/google/gmailx/v1", "https://www.googleapis.com/gmailx/v1", "/google"),
    ("/google/Gmail/v1", "https://www.googleapis.com/Gmail/v1", "/google"),
    ("/google/gm%61il/v1", "https://www.googleapis.com/gm%61il/v1", "/google"),
    ("/google//gmail/v1", "https://www.googleapis.com//gmail/v1", "/google"),
    ("/google", "https://www.googleapis.com/", "/google"),
    ("/google/", "https://www.googleapis.com/", "/google"),
])
def test_named_upstreams(raw: str, expected: str, prefix: str) -> None:
    assert route(google(), raw) == expected
    assert choose_upstream(google(), parse_target(raw)).prefix == prefix


def test_without_a_default_an_unknown_name_is_a_404_naming_the_allowed_ones() -> None:
    p = google(upstream=None)
    assert route(p, "/google/drive/v3/files") == "https://www.googleapis.com/drive/v3/files"
    for raw in ("/google/calendar/v3", "/google", "/google/", "/google/gm%61il/x"):
        with pytest.raises(UnknownUpstream) as err:
            choose_upstream(p, parse_target(raw))
        assert err.value.status == 404 and err.value.code == "unknown_upstream"
        assert err.value.extra["upstreams"] == ["drive", "gmail", "sheets"]
        assert "drive, gmail, sheets" in err.value.message


def test_dot_segments_cannot_leave_a_named_base() -> None:
    for raw in ("/google/gmail/../drive/x", "/google/gmail/%2e%2e/x", "/google/gmail/..",
                "/google/../google/gmail"):
        with pytest.raises(BadRequest):
            parse_target(raw)


def test_the_token_base_is_used_only_for_providers_that_ask_for_it() -> None:
    instance = URL("https://eu7.my.salesforce.com")
    sf = ProviderConfig(name="sf", upstream_from_token="instance_url")
    choice = choose_upstream(sf, parse_target("/sf/services/data/v60.0/query?q=x"))
    assert choice == UpstreamChoice(None, parse_target("/sf/services/data/v60.0/query?q=x"),
                                    "/sf")
    assert base_url(sf, choice, instance) == instance
    assert base_url(sf, choice, None) is None  # no base named: the handler answers 502
    fallback = ProviderConfig(name="sf", upstream=WWW, upstream_from_token="instance_url")
    assert base_url(fallback, choice, None) == WWW
    # A provider without the quirk ignores whatever base a lease might carry.
    assert route(google(), "/google/x", token_base=instance) == "https://www.googleapis.com/x"
    assert route(google(upstream_from_token="instance_url"), "/google/gmail/x",
                 token_base=instance) == "https://gmail.googleapis.com/gmail/x"


@pytest.mark.parametrize(("token_type", "scheme", "expected"), [
    ("Bearer", "Bearer", "Bearer tok"),
    ("bearer", "OAuth", "OAuth tok"),  # SoundCloud
    ("", "token", "token tok"),
    ("MAC", "OAuth", "MAC tok"),  # a token of another type names its own scheme
])
def test_upstream_auth_scheme(token_type: str, scheme: str, expected: str) -> None:
    assert authorization_value(token_type, "tok", scheme) == expected


# --------------------------------------------------------------------------- property

NAMES = st.sampled_from(["gmail", "drive", "a", "a.b", "x-1", "~t", "v1"])
BASES = st.builds(
    lambda host, path: URL.build(scheme="https", host=host, path=path, encoded=True),
    st.sampled_from(["a.example", "b.example", "c.example:8443", "127.0.0.1"]),
    st.sampled_from(["", "/", "/v1", "/a/b", "/gmail", "/%7Euser"]))
PIECES = ["/", "gmail", "drive", "a", "a.b", "x-1", "~t", "v1", "%2F", "%2f", "..", ".",
          "%2e", "%2e%2e", "%252e", "\\", "%5c", ";", "@", "evil.example", "//", ":", "?",
          "%3F", "#", "%00", "http:", "%67mail", "&", "="]


@st.composite
def providers(draw: st.DrawFn) -> ProviderConfig:
    named = draw(st.dictionaries(NAMES, BASES, max_size=4))
    default = draw(st.none() | BASES)
    return ProviderConfig(name="p", upstream=default, upstreams=named)


@settings(max_examples=400, deadline=None)
@given(providers(), st.lists(st.sampled_from(PIECES), max_size=10).map("".join),
       st.none() | BASES)
@example(ProviderConfig(name="p", upstream=URL("https://a.example/v1"),
                        upstreams={"gmail": URL("https://b.example/gmail")}),
         "/gmail/..%2f..%2fx", URL("https://c.example"))
def test_a_request_only_reaches_an_allowlisted_base(p: ProviderConfig, rest: str,
                                                    token_base: URL | None) -> None:
    raw = "/p" + rest
    try:
        target = parse_target(raw)
        choice = choose_upstream(p, target)
    except (BadRequest, UnknownUpstream):
        return
    base = base_url(p, choice, token_base)  # p has no upstream_from_token: never used
    assert base is not None
    assert base in (p.upstream, *p.upstreams.values())
    url = upstream_url(base, choice.target)
    assert (url.scheme, url.raw_authority) == (base.scheme, base.raw_authority)
    assert url.raw_path.startswith(base.raw_path.rstrip("/"))
    below = choice.target.path
    expected = base.raw_path.rstrip("/") + below if below else (base.raw_path or "/")
    assert url.raw_path == expected + ("?" if choice.target.query == "" else "")
    assert url.raw_query_string == (choice.target.query or "")
    if choice.name is not None:  # the name was the first segment, and is gone from the path
        assert base == p.upstreams[choice.name]
        assert (target.path + "/").startswith(f"/{choice.name}/")
        assert target.path == f"/{choice.name}" + choice.target.path
    else:
        assert base == p.upstream and choice.target == target
