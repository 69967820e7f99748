"""End to end through a real gateway app: routing, headers, redirects, compression, faults."""

from __future__ import annotations

import json
from collections.abc import Mapping

import aiohttp
import pytest

from tests.fakes.upstream import DENIED_BODY, GZIP_BODY, FakeUpstream
from tests.proxy.conftest import GATEWAY_KEY, Gateway, MakeGateway, Tokens, get, raw_request


def _error(resp_headers: Mapping[str, str], body: bytes, code: str) -> None:
    assert json.loads(body)["error"] == code
    assert resp_headers["Gateway-Error"] == code


# --------------------------------------------------------------------------- routing

@pytest.mark.parametrize(("raw", "upstream_path"), [
    ("/up/a%2Fb/c", "/api/a%2Fb/c"),
    ("/up/x?a=1&a=2&b=3&a=0", "/api/x?a=1&a=2&b=3&a=0"),
    ("/up/x?q=a+b%20c%2Bd", "/api/x?q=a+b%20c%2Bd"),
    ("/up/%C3%A9t%C3%A9?n=%E2%9C%93", "/api/%C3%A9t%C3%A9?n=%E2%9C%93"),
    ("/up/p?", "/api/p?"),
    ("/up?", "/api?"),
    ("/up", "/api"),
    ("/up/", "/api/"),
    ("/up/a;v=1/b", "/api/a;v=1/b"),
    ("/up/%7Euser/~x", "/api/%7Euser/~x"),
    ("/up/x?a=%2F&b=/&c=?&d=%3f", "/api/x?a=%2F&b=/&c=?&d=%3f"),
    ("/up//x", "/api//x"),
    ("/up/%zz", "/api/%zz"),
    ("/root/x?y", "/x?y"),
    ("/root", "/"),
])
async def test_path_and_query_forwarded_byte_for_byte(gateway: Gateway, raw: str,
                                                      upstream_path: str) -> None:
    resp = await raw_request(gateway.port, get(raw))
    assert resp.status == 200, resp.body
    assert [r.raw_path for r in gateway.upstream.requests] == [upstream_path]


@pytest.mark.parametrize("raw", [
    "/up/../x", "/up/a/../../x", "/up/./x", "/up/%2e%2e/x", "/up/%2E%2e/x", "/up/.%2e/x",
    "/up/%252e%252e/x", "/up/%25252E%25252E/x", "/up/a%2F..%2Fx", "/up/a%2f%2E%2E%2fx",
    "/up/..%5cx", "/up/a\\..\\x", "/up/a%5C..%5Cx", "/up/..;/x", "/up/%u002e%u002e/x",
    "/up/%c0%ae%c0%ae/x", "/up/%EF%BC%8E%EF%BC%8E/x", "/up/a%00", "/up/a%0d%0aX:1",
    "/../up/x", "/up/..",
])
async def test_dot_segments_and_tricks_are_refused(gateway: Gateway, raw: str) -> None:
    resp = await raw_request(gateway.port, get(raw))
    assert resp.status == 400
    _error(resp.headers, resp.body, "bad_request")
    assert gateway.upstream.requests == []


async def test_absolute_form_target_is_refused(gateway: Gateway) -> None:
    target = str(gateway.upstream.url / "api" / "x")
    resp = await raw_request(gateway.port, get(target))
    assert resp.status == 400
    _error(resp.headers, resp.body, "bad_request")
    assert gateway.upstream.requests == []


async def test_connect_is_refused(gateway: Gateway) -> None:
    up = gateway.upstream.url
    head = (f"CONNECT {up.host}:{up.port} HTTP/1.1\r\nHost: {up.host}:{up.port}\r\n"
            f"Authorization: Bearer {GATEWAY_KEY}\r\nConnection: close\r\n\r\n").encode()
    resp = await raw_request(gateway.port, head)
    assert resp.status == 405
    _error(resp.headers, resp.body, "method_not_allowed")
    assert gateway.upstream.requests == []


async def test_unknown_provider(gateway: Gateway) -> None:
    async with gateway.request("GET", "/nope/x") as r:
        assert r.status == 404
        _error(r.headers, await r.read(), "unknown_provider")
    assert gateway.upstream.requests == []


async def test_provider_without_config(gateway: Gateway) -> None:
    async with gateway.request("GET", "/nocfg/x") as r:
        assert r.status == 503
        body = await r.read()
        _error(r.headers, body, "provider_not_configured")
        assert b"client_id is not set" in body


async def test_unauthenticated(gateway: Gateway) -> None:
    async with gateway.session.get(gateway.url("/up/x"),
                                   headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
        _error(r.headers, await r.read(), "unauthenticated")
    assert gateway.upstream.requests == []
    assert gateway.tokens.leases == 0


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD",
                                    "PROPFIND"])
async def test_all_methods(gateway: Gateway, method: str) -> None:
    async with gateway.request(method, "/up/m", data=b"x" if method != "HEAD" else None) as r:
        assert r.status == 200
        body = await r.read()
    rec = gateway.upstream.requests[0]
    assert rec.method == method
    if method == "HEAD":
        assert body == b""
        assert int(r.headers["Content-Length"]) > 0
    else:
        assert json.loads(body)["body_length"] == 1


async def test_lease_upstream_overrides_the_provider_base(make_gateway: MakeGateway,
                                                          upstream: FakeUpstream) -> None:
    gw = await make_gateway(tokens=Tokens(upstream=upstream.url / "tenant-7"))
    await raw_request(gw.port, get("/sf/x?y=1"))
    assert gw.upstream.requests[0].raw_path == "/tenant-7/x?y=1"
    # A provider without upstream_from_token ignores a token-supplied base (invariant 2).
    await raw_request(gw.port, get("/up/x?y=1"))
    assert gw.upstream.requests[1].raw_path == "/api/x?y=1"


# --------------------------------------------------------------------------- headers

async def test_request_header_policy(gateway: Gateway) -> None:
    head = (
        "POST /up/h HTTP/1.1\r\n"
        "Host: gw.test:1234\r\n"
        f"Authorization: Bearer {GATEWAY_KEY}\r\n"
        f"Proxy-Authorization: Bearer {GATEWAY_KEY}\r\n"
        "Connection: close, X-Secret-Hop\r\n"
        "X-Secret-Hop: 1\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Cookie: a=1; gateway_session=SESSIONID; b=2\r\n"
        "X-Forwarded-For: 198.51.100.9\r\n"
        "X-End-To-End: kept\r\n"
        "Content-Length: 5\r\n\r\n"
    ).encode()
    resp = await raw_request(gateway.port, head, b"hello")
    assert resp.status == 200
    rec = gateway.upstream.requests[0]
    up = gateway.upstream.url
    assert rec.header_all("Authorization") == ["Bearer good-token"]
    assert rec.header("Proxy-Authorization") is None
    assert rec.header("Host") == f"{up.host}:{up.port}"
    assert rec.header("Cookie") == "a=1; b=2"
    for name in ("X-Secret-Hop", "Keep-Alive", "TE", "Connection", "Transfer-Encoding"):
        assert rec.header(name) in (None, "keep-alive"), name
    assert rec.header("X-End-To-End") == "kept"
    assert rec.header("X-Forwarded-For") == "198.51.100.9, 127.0.0.1"
    assert rec.header("X-Forwarded-Proto") == "http"
    assert rec.header("X-Forwarded-Host") == "gw.test:1234"
    assert rec.header("Content-Length") == "5"
    # Nothing the client did not send is invented (no Accept-Encoding would make upstreams
    # compress unasked).
    for name in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type"):
        assert rec.header(name) is None, name
    assert GATEWAY_KEY not in repr(rec.headers)
    assert "SESSIONID" not in repr(rec.headers)


async def test_forwarded_headers_can_be_disabled(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(forwarded_headers=False)
    await raw_request(gw.port, get("/up/x"))
    rec = gw.upstream.requests[0]
    assert [k for k, _ in rec.headers if k.lower().startswith("x-forwarded")] == []


async def test_response_header_policy(gateway: Gateway) -> None:
    resp = await raw_request(gateway.port, get("/up/hop"))
    assert resp.status == 200
    assert resp.body == b"hop"
    assert resp.headers["X-Kept"] == "yes"
    for name in ("X-Secret-Hop", "Keep-Alive", "Proxy-Authenticate", "Upgrade", "Trailer"):
        assert name not in resp.headers, name
    assert resp.headers.getall("Set-Cookie") == ["upstream_cookie=1; Path=/"]


# --------------------------------------------------------------------------- bodies

async def test_gzip_passes_through_still_compressed(gateway: Gateway) -> None:
    async with gateway.request("GET", "/up/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.status == 200
        assert r.headers["Content-Encoding"] == "gzip"
        assert int(r.headers["Content-Length"]) == len(GZIP_BODY)
        assert await r.read() == GZIP_BODY
    assert gateway.upstream.requests[0].header("Accept-Encoding") == "gzip"


async def test_upstream_errors_pass_through_unchanged(gateway: Gateway) -> None:
    gateway.upstream.accepted_tokens.clear()
    async with gateway.request("GET", "/up/echo?status=503") as r:
        assert r.status == 503
        assert "Gateway-Error" not in r.headers
        assert json.loads(await r.read())["raw_path"] == "/api/echo?status=503"
    async with gateway.request("GET", "/up/protected") as r:
        assert r.status == 401
        assert await r.read() == DENIED_BODY
        assert "Gateway-Error" not in r.headers
        assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


# --------------------------------------------------------------------------- redirects

async def test_redirect_is_returned_not_followed(gateway: Gateway) -> None:
    async with gateway.request("GET", "/up/redirect") as r:
        assert r.status == 302
        assert r.headers["Location"] == "http://gw.example:8080/up/landing"
        assert await r.read() == b"moved"
    assert gateway.upstream.hits("landing") == 0


@pytest.mark.parametrize(("to", "expected"), [
    ("/api/next?p=2", "/up/next?p=2"),
    ("https://elsewhere.example/x", "https://elsewhere.example/x"),
    ("/other/x", "/other/x"),
])
async def test_redirect_location_rewriting(gateway: Gateway, to: str, expected: str) -> None:
    async with gateway.request("POST", f"/up/redirect?status=307&to={to}", data=b"body") as r:
        assert r.status == 307
        assert r.headers["Location"] == expected
    assert len(gateway.upstream.requests) == 1


# --------------------------------------------------------------------------- faults

async def test_refused_connection_is_502(gateway: Gateway) -> None:
    async with gateway.request("GET", "/down/x") as r:
        assert r.status == 502
        _error(r.headers, await r.read(), "upstream_unreachable")


async def test_reset_before_answer_is_502(gateway: Gateway) -> None:
    async with gateway.request("GET", "/up/reset") as r:
        assert r.status == 502
        _error(r.headers, await r.read(), "upstream_unreachable")


async def test_reset_mid_body_aborts_the_client_connection(gateway: Gateway) -> None:
    async with gateway.request("GET", "/up/reset-mid-body") as r:
        assert r.status == 200  # already started: never rewritten
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_timeout_is_504(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(read_timeout=0.2)
    async with gw.request("GET", "/up/slow") as r:
        assert r.status == 504
        _error(r.headers, await r.read(), "upstream_timeout")


async def test_timeout_mid_body_aborts_the_client_connection(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(read_timeout=0.2)
    async with gw.request("GET", "/up/slow-body") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
