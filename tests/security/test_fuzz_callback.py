"""The OAuth callback under arbitrary query strings (SPEC invariants 7 and 8; RFC 6749
§4.1.2 and §10.12, RFC 9700 §2.1 and §4.7): it never answers 500 and never stores anything.

* Without the state of a flow this browser started, every query changes nothing at all: the
  database is identical row for row, and the token endpoint is never called.
* With the real state and flow cookie but fuzzed ``code``/``error``/other parameters, the
  attempt is consumed (single use) and fails cleanly: no connection is stored.

tests/integration/test_consent.py covers the hand-picked cases (replay, another browser,
expiry); this is the same promise for whatever a hypothesis can think of.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from yarl import URL

from tests.security.conftest import PASSWORD, SecureGateway, db_rows, fuzz

QUERY_ALPHABET = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#")
PARAM_NAMES = ["state", "code", "error", "error_description", "error_uri", "iss", "scope",
               "session_state", "id_token", "access_token", "return_to", "STATE", "state[]"]
VALUES = (st.text(QUERY_ALPHABET, max_size=40)
          | st.sampled_from(["", "%", "%zz", "%ff%fe", "%00", "%E2%80%AE", "a" * 600,
                             "access_denied", "invalid_request", "<script>alert(1)</script>",
                             "..%2f..%2f", "http://evil.example/", "%0d%0aSet-Cookie:%20x=1"]))


@st.composite
def queries(draw: st.DrawFn) -> str:
    """A raw query: either any text, or a list of (mostly OAuth) parameters."""
    if draw(st.booleans()):
        return draw(st.text(QUERY_ALPHABET, max_size=120))
    pairs = draw(st.lists(st.tuples(st.sampled_from(PARAM_NAMES) | st.text(QUERY_ALPHABET,
                                                                             max_size=8),
                                    VALUES), max_size=6))
    return "&".join(f"{k}={v}" for k, v in pairs)


@pytest.fixture
async def flow_gateway(secure_gateway: Any) -> tuple[SecureGateway, aiohttp.ClientSession]:
    """alice connected once; her browser logged in, with an unfinished flow pending."""
    gw: SecureGateway = await secure_gateway()
    await gw.connect_alice(("fake",))
    browser = gw.client()
    assert (await gw.login(browser, "alice", PASSWORD)).status == 303
    start = await browser.get(gw.url / "_gateway/connect/fake", allow_redirects=False)
    assert start.status == 302
    return gw, browser


def _assert_clean_failure(resp: aiohttp.ClientResponse, body: str, query: str) -> None:
    assert resp.status < 500 or resp.status in (502, 503), (query, resp.status, body[:300])
    assert resp.status >= 400, (query, resp.status)
    assert resp.headers.get("Gateway-Error"), (query, resp.status)
    assert "Traceback" not in body


@fuzz(200)
@example(query="state=nope&code=x")
@example(query="state=&state=x&code=")
@example(query="state=" + "a" * 600)
@example(query="%ff=%fe&state=%ff")
@example(query="error=access_denied&state=x")
@example(query="state=x&code=x&iss=http://evil.example")
@given(query=queries())
async def test_arbitrary_callbacks_store_nothing(
        flow_gateway: tuple[SecureGateway, aiohttp.ClientSession], query: str) -> None:
    gw, browser = flow_gateway
    before, hits = db_rows(gw.db_path), gw.auth.hits["token"]
    url = URL(f"{gw.url}/_gateway/callback?{query}", encoded=True)
    async with browser.get(url, allow_redirects=False) as resp:
        body = await resp.text(errors="replace")
    _assert_clean_failure(resp, body, query)
    assert db_rows(gw.db_path) == before, query
    assert gw.auth.hits["token"] == hits, query


async def _fresh_state(gw: SecureGateway, browser: aiohttp.ClientSession) -> str:
    start = await browser.get(gw.url / "_gateway/connect/fake", allow_redirects=False)
    assert start.status == 302, await start.text()
    return URL(start.headers["Location"]).query["state"]


@fuzz(60)
@example(query="code=forged")
@example(query="code=")
@example(query="error=access_denied&error_description=%3Cscript%3E")
@example(query="code=x&code=y")
@example(query="code=x&iss=http://evil.example")
@given(query=queries())
async def test_real_state_with_fuzzed_parameters_stores_no_connection(
        flow_gateway: tuple[SecureGateway, aiohttp.ClientSession], query: str) -> None:
    gw, browser = flow_gateway
    state = await _fresh_state(gw, browser)
    before = db_rows(gw.db_path)
    url = URL(f"{gw.url}/_gateway/callback?state={state}&{query}", encoded=True)
    async with browser.get(url, allow_redirects=False) as resp:
        body = await resp.text(errors="replace")
    _assert_clean_failure(resp, body, query)
    after = db_rows(gw.db_path)
    assert after["connections"] == before["connections"], query
    assert after["identities"] == before["identities"] and after["api_keys"] == \
        before["api_keys"]
    # The attempt was consumed (single use), or refused before (a second state came first).
    assert len(after["pending_authorizations"]) <= len(before["pending_authorizations"])
    assert not re.search(r"<script>", body)  # error texts from the provider are escaped
