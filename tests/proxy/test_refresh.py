"""Reactive refresh: a 401 to a token we believed valid is retried once, when replayable."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator

from tests.fakes.upstream import DENIED_BODY, pattern, pattern_sha256
from tests.proxy.conftest import MakeGateway, Tokens


async def _chunks(n: int) -> AsyncIterator[bytes]:
    for block in pattern(n):
        yield block


async def test_401_refreshes_and_retries_once(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token="stale", next_token="good-token"))
    async with gw.request("GET", "/up/protected?x=1") as r:
        assert r.status == 200
        await r.read()
    assert gw.tokens.rejections == ["stale"]
    recs = gw.upstream.requests
    assert [r.header("Authorization") for r in recs] == ["Bearer stale", "Bearer good-token"]
    assert [r.raw_path for r in recs] == ["/api/protected?x=1"] * 2


async def test_401_passes_through_when_no_better_token(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token="stale"))
    async with gw.request("GET", "/up/protected") as r:
        assert r.status == 401
        assert await r.read() == DENIED_BODY
        assert "Gateway-Error" not in r.headers
        assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert r.headers["Content-Length"] == str(len(DENIED_BODY))
    assert gw.tokens.rejections == ["stale"]
    assert gw.upstream.hits("protected") == 1


async def test_second_401_is_not_retried_again(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token="stale", next_token="also-bad"))
    async with gw.request("GET", "/up/protected") as r:
        assert r.status == 401
        assert await r.read() == DENIED_BODY
    assert gw.tokens.rejections == ["stale"]
    assert gw.upstream.hits("protected") == 2


async def test_small_body_is_replayed(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token="stale", next_token="good-token"))
    async with gw.request("POST", "/up/protected", data=b"payload" * 100,
                          headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 200
        got = json.loads(await r.read())
    recs = gw.upstream.requests
    assert len(recs) == 2
    assert recs[0].body_sha256 == recs[1].body_sha256 == got["body_sha256"]
    assert recs[1].body_length == 700
    assert recs[1].header("Content-Type") == "text/plain"


async def test_small_chunked_body_is_replayed(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token="stale", next_token="good-token"))
    async with gw.request("PUT", "/up/protected", data=_chunks(5000)) as r:
        assert r.status == 200
        got = json.loads(await r.read())
    assert got["body_sha256"] == pattern_sha256(5000)
    assert gw.upstream.hits("protected") == 2


async def test_large_body_is_not_replayed(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token="stale", next_token="good-token"),
                            replay_body_bytes=1024)
    async with gw.request("POST", "/up/protected", data=b"x" * 4096) as r:
        assert r.status == 401
        assert await r.read() == DENIED_BODY
    assert gw.tokens.rejections == []
    assert gw.upstream.hits("protected") == 1


async def test_large_chunked_body_is_not_replayed(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token="stale", next_token="good-token"),
                            replay_body_bytes=1024)
    async with gw.request("POST", "/up/protected", data=_chunks(100_000)) as r:
        assert r.status == 401
    assert gw.tokens.rejections == []
    assert gw.upstream.requests[0].body_sha256 == pattern_sha256(100_000)


async def test_lowercase_bearer_token_type_is_normalised(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tokens=Tokens(token_type="bearer"))
    async with gw.request("GET", "/up/protected") as r:
        assert r.status == 200
    assert gw.upstream.requests[0].header("Authorization") == "Bearer good-token"


async def test_large_401_body_streams_through_without_retry(make_gateway: MakeGateway) -> None:
    """A 401 whose body is too big to hold while refreshing is passed on, whole."""
    gw = await make_gateway(tokens=Tokens(next_token="other"))
    n = 300_000
    async with gw.request("GET", f"/up/stream?bytes={n}&status=401") as r:
        assert r.status == 401
        body = await r.read()
    assert (len(body), hashlib.sha256(body).hexdigest()) == (n, pattern_sha256(n))
    assert gw.tokens.rejections == []
    assert gw.upstream.hits("stream") == 1


async def test_small_401_body_is_passed_on_whole_after_a_failed_refresh(
        make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    n = 20_000  # chunked, under the hold limit
    async with gw.request("GET", f"/up/stream?bytes={n}&status=401") as r:
        assert r.status == 401
        body = await r.read()
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(n)
    assert gw.tokens.rejections == ["good-token"]
