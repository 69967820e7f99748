"""Routing under attack, through the real server (SPEC invariants 2 and 3; RFC 9700 §4.9.1:
no access token ever goes to a resource server other than the configured one).

Hypothesis writes raw request lines (targets full of dot-segments, encodings, separators,
absolute forms, CR/LF) and hostile headers (Host, X-Forwarded-*, Forwarded, X-Original-URL,
Upgrade...), sends them over a raw socket to the whole gateway, and checks, for every one:

* every request that reached any upstream arrived at the host of the provider named by the
  target's first segment, under that provider's base path, with the remainder byte for byte;
* no request reached an upstream when the gateway answered with an error of its own;
* the gateway key never reached an upstream; the only credential there is the access token;
* the gateway never answered 5xx except the mapped upstream/token errors (with Gateway-Error).

The pure router has its own table and property tests in tests/proxy/test_routing.py; this is
the same promise checked end to end, where the HTTP parser, aiohttp's URL handling and the
client session could each undo it.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.security.conftest import (
    RECORDED,
    SecureGateway,
    fuzz,
    raw_exchange,
    request_bytes,
)

BASES = {"fake": "/api", "rec": "/v1/base", "two": "/b"}

# Pieces a request target is made of: well-formed ones (most of them: these reach the
# router and the upstream) and ones the HTTP parser itself should refuse.
CLEAN = ["/", "/", "/", "/", ".", "..", "%2e", "%2E", "%2e%2e", "%2f", "%2F", "%5c", "%5C", "\\",
         "%00", "%252e", "%252f", "%25", "%", "%u002e", "%U002E", ";", ";x=1", "..;", "@", "//",
         ":", "%c0%ae", "%c0%af", "%e0%80%ae", "%ef%bc%8e", "%e9", "%ff", "~", "a", "b", "a",
         "b", "api", "v1", "base", "*", "&", "=", "+", "%20", "%0d%0a", "%09", "http:",
         "localhost", "127.0.0.1", "!", "$", "'", "(", ")", ",", "|", "^", "`", "{", "}", "[",
         "]", '"', "<", ">"]
HOSTILE = [" ", "\t", "\r\n", "\x7f", "\x00", "#", "?", "\uff0e", "\u2024", "é", "\u202e",
           "\udcff", "\udc80"]  # (the last two: raw bytes 0xff, 0x80 via surrogateescape)
PIECES = CLEAN * 6 + HOSTILE
QUERY_PIECES = [*"ab=&%?#/+.;2e5cF0 ", "%2e%2e/", "é", "%00", "%zz"]
PROVIDERS = ["fake", "rec", "two", "nope", "_gateway", "", "%72ec", "REC", "rec.", "rec%2f..",
             "two%2f..%2frec", "..", "%2e%2e", "rec;", "rec\\..\\two"]
METHODS = ["GET", "GET", "GET", "GET", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD",
           "OPTIONS", "TRACE", "PROPFIND", "CONNECT", "get", "G\x00T"]  # (last two: hostile)
HEADER_NAMES = ["Host", "X-Forwarded-Host", "X-Forwarded-For", "X-Forwarded-Proto",
                "Forwarded", "X-Original-URL", "X-Rewrite-URL", "X-Http-Method-Override",
                "Connection", "Upgrade", "Proxy-Authorization", "Cookie", "Via", "Max-Forwards",
                "Expect", "TE", "Trailer", "Keep-Alive", "Referer", "Origin", "X-Request-Id",
                "Accept-Encoding", "Authorization"]
SAFE_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
ODD_TEXT = st.text(st.characters(min_codepoint=0x01, max_codepoint=0x17F,
                                 exclude_categories=["Cs"]), max_size=20)

# The upstreams' host:port are only known at run time: strategies draw these placeholders.
AUTHORITIES = ("<rec>", "<two>", "<fake>")
SPECIAL_VALUES = [*AUTHORITIES, "evil.example", "http://evil.example/", "websocket", "Upgrade",
                  "h2c", "close, Authorization", "for=1.2.3.4;host=evil.example", "/two/../rec",
                  "../../etc/passwd", "100-continue", "chunked"]


@st.composite
def targets(draw: st.DrawFn, hostile: bool) -> str:
    """Mostly well-formed origin-form targets (these reach the router); with ``hostile``,
    also pieces and forms the HTTP parser should refuse, and absolute forms."""
    names = ["fake", "rec", "two"] * 20 + PROVIDERS
    provider = draw(st.sampled_from(names) | st.text(
        st.characters(exclude_categories=["Cs"]), max_size=6) if hostile
        else st.sampled_from(names))
    pieces = PIECES if hostile else CLEAN
    rest = "".join(draw(st.lists(st.sampled_from(pieces), max_size=14)))
    query = draw(st.none() | st.lists(st.sampled_from(QUERY_PIECES), max_size=12).map("".join))
    target = f"/{provider}{rest}" + ("" if query is None else f"?{query}")
    form = draw(st.sampled_from(["origin", "absolute", "scheme-relative", "no-slash",
                                 "asterisk"] if hostile else ["origin"] * 9 + ["absolute"]))
    if form == "absolute":
        target = f"http://{draw(st.sampled_from(AUTHORITIES))}{target}"
    elif form == "scheme-relative":
        target = f"//{draw(st.sampled_from(AUTHORITIES))}{target}"
    elif form == "no-slash":
        target = target[1:]
    elif form == "asterisk":
        target = "*"
    return target


@st.composite
def header_sets(draw: st.DrawFn, hostile: bool) -> list[tuple[str, str]]:
    values = st.sampled_from(SPECIAL_VALUES) | SAFE_TEXT
    if hostile:
        values |= ODD_TEXT
    names = st.sampled_from(HEADER_NAMES) | st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z")
    pairs = draw(st.lists(st.tuples(names, values), max_size=6))
    # Framing headers are the parser's business (tests/proxy covers them) and an unmatched
    # length would only make this client wait: the body below is always framed correctly.
    pairs = [(k, v) for k, v in pairs if k.lower() not in ("content-length", "transfer-encoding")]
    if not hostile:  # one Host at most (two are the parser's 400)
        hosts = [i for i, (k, _) in enumerate(pairs) if k.lower() == "host"]
        pairs = [p for i, p in enumerate(pairs) if i not in hosts[1:]]
    return pairs


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]], bytes]:
    hostile = draw(st.sampled_from([False] * 4 + [True]))
    method = draw(st.sampled_from(METHODS if hostile else METHODS[:-2]))
    body = draw(st.binary(max_size=64))
    return method, draw(targets(hostile)), draw(header_sets(hostile)), body


def _path_of(raw: str) -> str:
    return raw.split("?", 1)[0]


@pytest.fixture
async def fuzz_gateway(secure_gateway: Any) -> SecureGateway:
    gw: SecureGateway = await secure_gateway()
    await gw.connect_alice(("fake", "rec", "two"))
    return gw


def _check_upstreams(gw: SecureGateway, before: dict[str, int], sent: str) -> list[str]:
    """The providers whose upstream got a request; asserts each was where it belonged."""
    assert gw.rec is not None and gw.two is not None
    reached = []
    hit: Any
    for name, hits, authority in (
            ("fake", gw.upstream.requests, f"{gw.upstream.url.host}:{gw.upstream.url.port}"),
            ("rec", gw.rec.hits, gw.rec.authority), ("two", gw.two.hits, gw.two.authority)):
        for hit in hits[before[name]:]:
            reached.append(name)
            path = _path_of(hit.raw_path)
            base = BASES[name]
            assert path == base or path.startswith(base + "/"), (sent, name, hit.raw_path)
            host = hit.host if name != "fake" else hit.header("Host")
            assert host == authority, (sent, name, host)
            values = [v for _, v in hit.headers]
            assert not any(gw.key in v for v in values), (sent, "gateway key forwarded")
            auth = [v for k, v in hit.headers if k.lower() == "authorization"]
            assert len(auth) == 1 and auth[0].startswith("Bearer "), (sent, auth)
            assert gw.auth.is_valid_access_token(auth[0][7:]) == "alice", (sent, auth)
    return reached


def _counts(gw: SecureGateway) -> dict[str, int]:
    assert gw.rec is not None and gw.two is not None
    return {"fake": len(gw.upstream.requests), "rec": len(gw.rec.hits),
            "two": len(gw.two.hits)}


@fuzz(250)
@example(request=("GET", "/rec/..%2f..%2ftwo/b", [], b""))
@example(request=("GET", "/rec/%2e%2e/%2e%2e/", [("Host", "evil.example")], b""))
@example(request=("GET", "/rec/x?a=/../../two", [], b""))
@example(request=("POST", "/two/%252e%252e/x", [("X-Original-URL", "/rec/")], b"abc"))
@example(request=("GET", "/rec/a\r\nHost: evil.example\r\nX: ", [], b""))
@given(request=requests())
async def test_no_request_leaves_its_providers_base(
        fuzz_gateway: SecureGateway,
        request: tuple[str, str, list[tuple[str, str]], bytes]) -> None:
    method, target, headers, body = request
    gw = fuzz_gateway
    assert gw.rec is not None and gw.two is not None
    real = {"<rec>": gw.rec.authority, "<two>": gw.two.authority,
            "<fake>": f"127.0.0.1:{gw.upstream.url.port}"}
    for placeholder, authority in real.items():
        target = target.replace(placeholder, authority)
        headers = [(k, v.replace(placeholder, authority)) for k, v in headers]
    if not any(k.lower() == "authorization" for k, _ in headers):
        headers.append(("Authorization", f"Bearer {gw.key}"))
    if not any(k.lower() == "host" for k, _ in headers):
        headers.append(("Host", f"127.0.0.1:{gw.port}"))
    headers += [("Content-Length", str(len(body))), ("Connection", "close")]
    before = _counts(gw)

    resp = await raw_exchange(gw.port, request_bytes(method, target, headers, body))

    assert resp is not None, f"no HTTP answer to {method} {target!r}"
    reached = _check_upstreams(gw, before, target)
    assert len(reached) <= 1, (target, reached)
    own = "Gateway-Error" in resp.headers
    if resp.status >= 500:
        assert own and resp.status in (502, 503, 504), (target, resp.status, resp.raw[:300])
    if own:
        assert reached == [], (target, "an upstream was called but the gateway answered")
    if reached and resp.status in (200, 404) and method.upper() != "HEAD" \
            and not any(c in target for c in " \t\r\n"):  # (whitespace ends a target)
        # Byte for byte: the upstream saw base + the remainder of the target, unchanged.
        name = reached[0]
        by_name: dict[str, list[Any]] = {"fake": list(gw.upstream.requests),
                                         "rec": list(gw.rec.hits), "two": list(gw.two.hits)}
        hits = by_name[name]
        assert target.startswith(f"/{name}"), (target, name)
        assert hits[-1].raw_path == BASES[name] + target[len(name) + 1:], (target, hits[-1])
        if name != "fake":
            assert resp.body.endswith(RECORDED), (target, resp.raw[:300])


async def test_the_server_still_serves_after_the_fuzz(fuzz_gateway: SecureGateway) -> None:
    """A sanity anchor for the property above: the same harness does see normal traffic."""
    gw = fuzz_gateway
    assert gw.rec is not None
    resp = await raw_exchange(gw.port, request_bytes(
        "GET", "/rec/x/y%2Fz?q=%2e%2e&b", [("Authorization", f"Bearer {gw.key}"),
                                          ("Host", "gw"), ("Connection", "close")]))
    assert resp is not None and resp.status == 200 and resp.body == RECORDED
    assert gw.rec.hits[-1].raw_path == "/v1/base/x/y%2Fz?q=%2e%2e&b"
    evil = await raw_exchange(gw.port, request_bytes(
        "GET", "/rec/..%2f..%2ftwo/b", [("Authorization", f"Bearer {gw.key}"),
                                        ("Host", "gw"), ("Connection", "close")]))
    assert evil is not None and evil.status == 400 and evil.headers["Gateway-Error"] == \
        "bad_request"
