"""SPEC invariants 5 and 6 across processes: gateways sharing one store (SQLite file or
PostgreSQL) refresh a token exactly once, survive the refreshing process being killed, and
pick up tokens another instance stored."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.scale.conftest import Cluster, HeldAnswers

MakeCluster = Callable[..., Awaitable[Cluster]]

REQUESTS = 300


def _token_of(body: dict[str, Any]) -> str:
    """The access token the upstream saw, from its echo of the request headers."""
    headers = {k.lower(): v for k, v in body["headers"]}
    return str(headers["authorization"]).removeprefix("Bearer ")


async def test_300_requests_on_3_processes_refresh_exactly_once(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    old = await cluster.seed(expires_in=-10)  # expired: every request needs the refresh
    gateways = await cluster.start(3)
    cluster.auth.hold_tokens()

    calls = [asyncio.create_task(cluster.call(gateways[i % 3], str(i))) for i in range(REQUESTS)]
    await cluster.auth.wait_for_hits("token", 1)
    for gw in gateways:  # every request has arrived and waits on the one refresh
        await cluster.wait_in_flight(gw, REQUESTS // 3)
    assert cluster.auth.hits["token"] == 1
    cluster.auth.release_tokens()
    results = await asyncio.gather(*calls)

    assert Counter(status for status, _ in results) == {200: REQUESTS}
    assert cluster.auth.hits["token"] == 1
    assert cluster.auth.grants == {"refresh_token": 1}
    conn = await cluster.connection()
    new = conn.tokens.access_token
    assert new != old.access_token and conn.version == 2 and conn.status == "active"
    assert {_token_of(body) for _, body in results} == {new}
    assert Counter(cluster.upstream.bearers()) == {new: REQUESTS}
    # The rotated refresh token was stored (invariant 6) and is the one the server expects.
    assert conn.tokens.refresh_token != old.refresh_token
    assert cluster.auth.is_valid_refresh_token(conn.tokens.refresh_token or "") == "alice"


async def _kill_the_refresher(cluster: Cluster, *, provider_answered: bool,
                              per_survivor: int = 20) -> list[tuple[int, Any]]:
    """Start 3 gateways, let the first begin a refresh, SIGKILL it mid-refresh (before the
    provider processed its request, or after the provider rotated but before the answer
    arrived), then send requests to the two survivors; their results."""
    auth = cluster.auth
    assert isinstance(auth, HeldAnswers)
    old = await cluster.seed(expires_in=-10)
    doomed, *survivors = await cluster.start(3)
    if provider_answered:
        auth.hold_answers()
    else:
        auth.hold_tokens()

    first = asyncio.create_task(cluster.call(doomed, "first"))
    if provider_answered:
        await auth.wait_answered(1)  # rotated at the provider; the answer is on its way
        assert auth.grants == {"refresh_token": 1}
    else:
        await auth.wait_for_hits("token", 1)
    calls = [asyncio.create_task(cluster.call(gw, f"{gw.name}-{i}"))
             for gw in survivors for i in range(per_survivor)]
    for gw in survivors:  # waiting on the refresh lock the doomed process holds
        await cluster.wait_in_flight(gw, per_survivor)
    assert auth.hits["token"] == 1
    stored = await cluster.connection()
    assert stored.tokens == old and stored.version == 1  # nothing stored yet

    await cluster.kill(doomed)
    try:
        await first
    except aiohttp.ClientError:
        pass  # its client saw the connection die, as it would
    else:
        raise AssertionError("the killed process answered")
    auth.release_answers()
    auth.release_tokens()
    results = await asyncio.gather(*calls)
    assert auth.hits["token"] == 2  # the dead process's, and exactly one more
    assert auth.hits["authorize"] == 0
    return results


@pytest.mark.parametrize("provider_answered", [False, True],
                         ids=["before-the-provider-answered", "after-the-provider-rotated"])
async def test_killing_the_refreshing_process_mid_refresh(make_cluster: MakeCluster,
                                                          provider_answered: bool) -> None:
    """The refreshing process dies (SIGKILL) during its token request. Its lock dies with
    it, the old tokens are still stored (a refresh stores nothing until the provider has
    answered), and a survivor refreshes with the old refresh token, once.

    The provider may already have processed the dead process's request and rotated that
    token: an answer nobody received. That window is why invariant 6 stores a rotated token
    before using it, and why providers that rotate refresh tokens accept the previous one
    for a short reuse grace period (answering with the successor); the fake runs with one
    here (``refresh_grace``), so nobody has to consent again.
    """
    cluster = await make_cluster(HeldAnswers(refresh_grace=60))
    results = await _kill_the_refresher(cluster, provider_answered=provider_answered)

    assert Counter(status for status, _ in results) == {200: len(results)}, results[:3]
    conn = await cluster.connection()
    assert conn.status == "active" and conn.version == 2
    assert {_token_of(body) for _, body in results} == {conn.tokens.access_token}
    assert cluster.auth.is_valid_access_token(conn.tokens.access_token) == "alice"
    assert cluster.auth.is_valid_refresh_token(conn.tokens.refresh_token or "") == "alice"
    # The survivors keep serving from their caches, without another refresh.
    assert (await cluster.call(cluster.instances[1], "after"))[0] == 200
    assert cluster.auth.hits["token"] == 2


async def test_without_a_reuse_grace_a_lost_rotation_needs_reconsent(
        make_cluster: MakeCluster) -> None:
    """The boundary of the above: a provider that rotated for a dead client and allows no
    reuse refuses the old refresh token. The survivors then report ``reconsent_required``
    (after re-reading the store: nobody else rotated it) instead of retrying forever."""
    cluster = await make_cluster(HeldAnswers(refresh_grace=0))
    results = await _kill_the_refresher(cluster, provider_answered=True, per_survivor=5)

    assert {(status, body["error"]) for status, body in results} == {
        (401, "reconsent_required")}
    assert (await cluster.connection()).status == "reconsent_required"


async def test_a_stale_cache_recovers_from_the_store_after_an_upstream_401(
        make_cluster: MakeCluster) -> None:
    """Two instances cache the same token; the provider revokes it. The first to hit the
    upstream's 401 refreshes; the other, on its own 401, re-reads the store and uses the
    token already there, without calling the token endpoint."""
    cluster = await make_cluster()
    old = await cluster.seed(expires_in=3600)
    a, b = await cluster.start(2)
    for gw in (a, b):
        status, body = await cluster.call(gw, f"warm-{gw.name}")
        assert status == 200 and _token_of(body) == old.access_token
    assert cluster.auth.hits["token"] == 0

    assert cluster.auth.revoke_token(old.access_token)
    status, body = await cluster.call(b, "b-after-revoke")
    assert status == 200
    new = _token_of(body)
    assert new != old.access_token and cluster.auth.hits["token"] == 1

    status, body = await cluster.call(a, "a-after-revoke")
    assert status == 200 and _token_of(body) == new
    assert cluster.auth.hits["token"] == 1  # the newer token came from the store
    # a tried its cached token once (the upstream's 401), then the stored one.
    assert cluster.upstream.bearers()[-2:] == [old.access_token, new]
    assert (await cluster.connection()).tokens.access_token == new
