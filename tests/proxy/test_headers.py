"""Header policy is pure: table tests for both directions."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.proxy.headers import (
    Forwarded,
    authorization_value,
    request_headers,
    response_headers,
    strip_gateway_cookies,
)

FWD = Forwarded(client="203.0.113.7", proto="https", host="gw.example")


def _req(pairs: list[tuple[str, str]], *, forwarded: Forwarded | None = None,
         websocket: bool = False) -> list[tuple[str, str]]:
    out = request_headers(CIMultiDict(pairs), authorization="Bearer T", forwarded=forwarded,
                          websocket=websocket)
    return list(out.items())


@pytest.mark.parametrize(("given", "expected"), [
    # end-to-end headers pass in order, repeated ones too
    ([("Accept", "a/b"), ("X-A", "1"), ("x-a", "2")],
     [("Accept", "a/b"), ("X-A", "1"), ("x-a", "2"), ("Authorization", "Bearer T")]),
    # hop-by-hop (RFC 9110 §7.6.1) and older names
    ([("Connection", "keep-alive"), ("Keep-Alive", "300"), ("TE", "trailers"),
      ("Trailer", "X"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
      ("Proxy-Connection", "keep-alive"), ("X-Keep", "1")],
     [("X-Keep", "1"), ("Authorization", "Bearer T")]),
    # headers named in Connection, across several Connection headers, any case
    ([("Connection", "close, X-Foo"), ("connection", " x-BAR ,"), ("X-Foo", "1"),
      ("X-Bar", "2"), ("X-Baz", "3")],
     [("X-Baz", "3"), ("Authorization", "Bearer T")]),
    # the gateway key never goes upstream, in either header; Host is the upstream's
    ([("Authorization", "Bearer gwk_secret"), ("Proxy-Authorization", "Bearer gwk_secret"),
      ("Host", "gw.example"), ("Expect", "100-continue")],
     [("Authorization", "Bearer T")]),
    # Content-Length stays (a sized body stays sized)
    ([("Content-Length", "12"), ("Content-Type", "text/plain")],
     [("Content-Length", "12"), ("Content-Type", "text/plain"), ("Authorization", "Bearer T")]),
    # gateway cookies are cut out, the rest kept (a header of only gateway cookies goes)
    ([("Cookie", "a=1; gateway_session=s3cret; b=2"), ("Cookie", "gateway_session=x")],
     [("Cookie", "a=1; b=2"), ("Authorization", "Bearer T")]),
    ([("Cookie", "a=1;b=2")], [("Cookie", "a=1;b=2"), ("Authorization", "Bearer T")]),
])
def test_request_headers(given: list[tuple[str, str]], expected: list[tuple[str, str]]) -> None:
    assert _req(given) == expected


def test_request_headers_forwarded() -> None:
    got = _req([("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-Proto", "gopher"),
                ("X-Forwarded-Host", "spoofed")], forwarded=FWD)
    assert got == [("Authorization", "Bearer T"),
                   ("X-Forwarded-For", "198.51.100.1, 203.0.113.7"),
                   ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "gw.example")]


def test_request_headers_forwarding_off_passes_client_values() -> None:
    got = _req([("X-Forwarded-For", "198.51.100.1")], forwarded=None)
    assert ("X-Forwarded-For", "198.51.100.1") in got
    assert not any(k == "X-Forwarded-Proto" for k, _ in got)


def test_request_headers_websocket_handshake_is_rebuilt() -> None:
    pairs = [("Sec-WebSocket-Key", "k"), ("Sec-WebSocket-Version", "13"),
             ("Sec-WebSocket-Extensions", "permessage-deflate"),
             ("Sec-WebSocket-Protocol", "chat"), ("Origin", "https://app.example")]
    assert _req(pairs, websocket=True) == [("Origin", "https://app.example"),
                                          ("Authorization", "Bearer T")]


def test_connection_cannot_remove_the_injected_token() -> None:
    assert _req([("Connection", "Authorization")]) == [("Authorization", "Bearer T")]


@pytest.mark.parametrize(("token_type", "expected"), [
    ("Bearer", "Bearer tok"), ("bearer", "Bearer tok"), ("BEARER", "Bearer tok"),
    ("", "Bearer tok"), ("MAC", "MAC tok"),
])
def test_authorization_value(token_type: str, expected: str) -> None:
    assert authorization_value(token_type, "tok") == expected


@pytest.mark.parametrize(("cookie", "expected"), [
    ("gateway_session=1", None),
    ("a=1; gateway_session=1", "a=1"),
    ("gateway_login_csrf=1;a=1 ;gateway_flow_x=2", "a=1"),
    ("a=1", "a=1"),
    ("a=1;  b=2", "a=1;  b=2"),  # untouched when nothing is removed
    ("xgateway_session=1", "xgateway_session=1"),
])
def test_strip_gateway_cookies(cookie: str, expected: str | None) -> None:
    assert strip_gateway_cookies(cookie) == expected


def test_response_headers() -> None:
    given = CIMultiDict([
        ("Content-Type", "application/json"), ("Content-Encoding", "gzip"),
        ("Content-Length", "42"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"),
        ("Proxy-Authenticate", "Basic"), ("Upgrade", "h2c"), ("Trailer", "X-Sum"),
        ("Location", "https://api.example.com/v1/x"), ("Content-Location", "/v1/y"),
        ("Set-Cookie", "gateway_session=evil; Path=/"), ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"), ("WWW-Authenticate", "Bearer"),
    ])
    got = list(response_headers(given, lambda loc: "REWRITTEN:" + loc).items())
    assert got == [
        ("Content-Type", "application/json"), ("Content-Encoding", "gzip"),
        ("Content-Length", "42"),
        ("Location", "REWRITTEN:https://api.example.com/v1/x"),
        ("Content-Location", "REWRITTEN:/v1/y"),
        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("WWW-Authenticate", "Bearer"),
    ]
