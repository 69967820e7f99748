"""Routing is pure: table tests plus a property test that nothing escapes the base path."""

from __future__ import annotations

import posixpath
import re
import unicodedata
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.errors import BadRequest
from gateway.proxy.routing import Target, parse_target, rewrite_location, upstream_url

BASE = URL("https://api.example.com/v1")


@pytest.mark.parametrize(("raw", "provider", "path", "query"), [
    ("/up", "up", "", None),
    ("/up/", "up", "/", None),
    ("/up?", "up", "", ""),
    ("/up/a/b?x=1", "up", "/a/b", "x=1"),
    ("/up/a%2Fb/c", "up", "/a%2Fb/c", None),
    ("/up/a?x=1&x=2&y=a+b%20c", "up", "/a", "x=1&x=2&y=a+b%20c"),
    ("/up/a?q=%3F%26?&=", "up", "/a", "q=%3F%26?&="),
    ("/up/%C3%A9t%C3%A9", "up", "/%C3%A9t%C3%A9", None),
    ("/up//double//slash", "up", "//double//slash", None),
    ("/up/a.b/.hidden/...x/x..", "up", "/a.b/.hidden/...x/x..", None),
    ("/up/%zz/%", "up", "/%zz/%", None),
    ("/up/a?x=../../etc", "up", "/a", "x=../../etc"),  # a query cannot move the path
    ("/Up/x", "Up", "/x", None),  # unknown later, not normalised here
])
def test_parse_target(raw: str, provider: str, path: str, query: str | None) -> None:
    assert parse_target(raw) == Target(provider, path, query)


@pytest.mark.parametrize("raw", [
    "/up/..", "/up/../x", "/up/a/../../x", "/up/./x", "/up/a/.",
    "/up/%2e%2e/x", "/up/%2E%2E/x", "/up/%2e./x", "/up/.%2E/x", "/up/%2e/x",
    "/up/%252e%252e/x", "/up/%25252e%25252e/x", "/up/%%32%65%%32%65/x",
    "/up/a%2F..%2Fb", "/up/a%2f%2e%2e%2fb", "/up/a%252F..%252Fb",
    "/up/..%5Cx", "/up/a\\..\\b", "/up/a%5C..%5Cb", "/up/a%255c..%255cb",
    "/up/..;/x", "/up/..;jsessionid=1/x", "/up/%2e%2e;/x",
    "/up/%u002e%u002e/x", "/up/%U002E%U002E/x",
    "/up/%c0%ae%c0%ae/x", "/up/%e0%80%ae./x", "/up/%c0%af",
    "/up/\uff0e\uff0e/x", "/up/%EF%BC%8E%EF%BC%8E/x",  # fullwidth dots (NFKC)
    "/up/.. /x", "/up/.../x",
    "/../up/x", "/%2e%2e/up/x",
    "/up/a%00b", "/up/a%0d%0aX-Injected:%201", "/up/a%250a", "/up/a%7f",
    "/up/a\x00", "/up/a b", "/up/a?b=c\x01",
    "/up/a#frag", "/up/a?b#frag",
    "http://evil.example/up/x", "https://api.example.com/v1/x", "//evil.example/x",
    "evil.example:443", "*", "",
    "/up/%" + "25" * 10 + "2e",  # nested past the decoding bound
])
def test_parse_target_rejects(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_target(raw)


@pytest.mark.parametrize(("base", "target", "expected"), [
    ("https://api.example.com/v1", Target("p", "/a/b", "x=1"), "/v1/a/b?x=1"),
    ("https://api.example.com/v1/", Target("p", "/a", None), "/v1/a"),
    ("https://api.example.com/v1", Target("p", "", None), "/v1"),
    ("https://api.example.com/v1/", Target("p", "", None), "/v1/"),
    ("https://api.example.com/v1", Target("p", "/", None), "/v1/"),
    ("https://api.example.com", Target("p", "", None), "/"),
    ("https://api.example.com", Target("p", "", "a=1"), "/?a=1"),
    ("https://api.example.com", Target("p", "/x", ""), "/x?"),
    ("https://api.example.com/v1", Target("p", "/a%2Fb", "q=a+b%20&q=2"),
     "/v1/a%2Fb?q=a+b%20&q=2"),
    ("https://api.example.com/v%201", Target("p", "/%C3%A9", None), "/v%201/%C3%A9"),
    ("https://api.example.com/v1?key=ignored", Target("p", "/a", None), "/v1/a"),
])
def test_upstream_url_is_byte_exact(base: str, target: Target, expected: str) -> None:
    url = upstream_url(URL(base), target)
    assert url.raw_path_qs == expected
    assert (url.scheme, url.raw_authority) == ("https", "api.example.com")


def test_upstream_url_keeps_port_and_ipv6() -> None:
    url = upstream_url(URL("http://[::1]:8443/base"), Target("p", "/x", None))
    assert str(url) == "http://[::1]:8443/base/x"


GW = URL("http://gw.example:8080/up")


@pytest.mark.parametrize(("location", "expected"), [
    ("https://api.example.com/v1/next?page=2", "http://gw.example:8080/up/next?page=2"),
    ("https://API.example.com:443/v1/a%2Fb#frag", "http://gw.example:8080/up/a%2Fb#frag"),
    ("https://api.example.com/v1", "http://gw.example:8080/up"),
    ("https://api.example.com/v1?", "http://gw.example:8080/up?"),
    ("//api.example.com/v1/x", "http://gw.example:8080/up/x"),
    ("/v1/x?y=1", "/up/x?y=1"),
    ("/v1", "/up"),
    # not under the base: untouched
    ("https://api.example.com/v2/x", "https://api.example.com/v2/x"),
    ("https://api.example.com/v10/x", "https://api.example.com/v10/x"),
    ("/v10", "/v10"),
    ("https://other.example.com/v1/x", "https://other.example.com/v1/x"),
    ("http://api.example.com/v1/x", "http://api.example.com/v1/x"),
    ("https://api.example.com:8443/v1/x", "https://api.example.com:8443/v1/x"),
    ("https://user@api.example.com/v1/x", "https://user@api.example.com/v1/x"),
    ("https://api.example.com:bad/v1", "https://api.example.com:bad/v1"),
    ("relative/path", "relative/path"),
    ("../up", "../up"),
    ("", ""),
])
def test_rewrite_location(location: str, expected: str) -> None:
    assert rewrite_location(location, BASE, GW) == expected


def test_rewrite_location_with_root_base() -> None:
    base = URL("http://127.0.0.1:9000")
    assert rewrite_location("http://127.0.0.1:9000/a?b", base, GW) == \
        "http://gw.example:8080/up/a?b"
    assert rewrite_location("/a", base, GW) == "/up/a"


# --------------------------------------------------------------------------- property

_ALPHABET = st.sampled_from(
    ["/", ".", "..", "%", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "2e", "\\", ";", "?",
     "&", "=", "+", "%20", "a", "b", "%u002e", "%c0%ae", "\uff0e", "@", ":", "#", "~",
     "%00", "%C3%A9", "//", "x", "e", "%3F", "%ee", "%ff", "%ED%A0%80", "%uD800"])


def _lenient_readings(path: str) -> list[str]:
    """How upstreams of varying leniency may read ``path``: decoded 0..n times (also
    ``%uXXXX``), backslashes as slashes, ``;params`` cut, NFKC-normalised."""
    readings, seen = [], path
    for _ in range(10):
        for form in (seen, unicodedata.normalize("NFKC", seen)):
            flat = form.replace("\\", "/")
            readings.append("/".join(s.split(";")[0] for s in flat.split("/")))
        decoded = unquote(re.sub(r"%[uU]([0-9A-Fa-f]{4})",
                                 lambda m: chr(int(m.group(1), 16)), seen))
        if decoded == seen:
            break
        seen = decoded
    return readings


@settings(max_examples=600, deadline=None)
@given(st.tuples(st.sampled_from(["/", "?", ""]), st.lists(_ALPHABET, max_size=14))
       .map(lambda t: t[0] + "".join(t[1])))
@example("/%2e%2e")
@example("/a%2f%2e%2e%2fb")
@example("?/../x")
def test_no_target_leaves_the_base(tail: str) -> None:
    base = URL("https://api.example.com/v1")
    raw = "/up" + tail
    try:
        target = parse_target(raw)
    except BadRequest:
        return
    if target.provider != "up":  # e.g. "/up.x": another provider's business
        assert not tail.startswith(("/", "?"))
        return
    url = upstream_url(base, target)
    # Same scheme and authority, always.
    assert (url.scheme, url.raw_authority) == ("https", "api.example.com")
    # The path and query are the base path plus exactly what the client sent.
    assert url.raw_path_qs == "/v1" + raw[len("/up"):] or (
        raw[len("/up"):].startswith("?") and url.raw_path_qs == "/v1/" + raw[len("/up"):])
    # No reading of the path, however lenient, has a dot-segment (RFC 3986 §5.2.4), so
    # resolving it can never climb above /v1.
    for reading in _lenient_readings(raw.split("?", 1)[0]):
        segments = reading.split("/")
        assert "." not in segments and ".." not in segments, reading
        assert posixpath.normpath("/v1" + reading).startswith("/v1")
