"""Single-flight refresh (SPEC invariants 5 and 6): concurrent callers, failures reaching every
waiter, cancellation, and several "processes" (TokenManagers on their own SqliteStore
connections to one database file, sharing its file locks).

The fake server's ``token_delay`` gate holds the one refresh at the token endpoint until every
caller is waiting on it; no test sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from gateway.errors import TokenEndpointUnavailable
from gateway.store.base import Identity
from gateway.tokens.manager import TokenManager
from tests.fakes.authserver import FakeAuthServer
from tests.tokens.conftest import Clock, CountingStore, Events, connect

N = 200


async def _expired_and_held(manager: TokenManager, store: CountingStore, fake: FakeAuthServer,
                            alice: Identity, clock: Clock) -> Any:
    """Warm the cache, let the token expire, close the gate at the token endpoint."""
    conn = await connect(store, fake, alice, clock)
    await manager.lease(alice, "fake")
    clock.advance(3601)
    fake.hold_tokens()
    return conn


async def test_concurrent_leases_cause_one_token_request(manager: TokenManager,
                                                         store: CountingStore,
                                                         fake: FakeAuthServer,
                                                         alice: Identity, clock: Clock) -> None:
    old = await _expired_and_held(manager, store, fake, alice, clock)
    tasks = [asyncio.create_task(manager.lease(alice, "fake")) for _ in range(N)]
    await fake.wait_for_hits("token", 1)
    assert not any(t.done() for t in tasks)  # all N are waiting on the one held refresh
    fake.release_tokens()
    leases = await asyncio.gather(*tasks)
    assert fake.hits["token"] == 1
    assert {lease.access_token for lease in leases} == {leases[0].access_token}
    assert leases[0].access_token != old.tokens.access_token
    stored = await store.get_connection(alice.id, "fake")
    assert stored is not None and stored.tokens.access_token == leases[0].access_token
    assert store.reads <= 3  # warm-up, the re-read under the lock, this check


async def test_failure_of_the_one_refresh_reaches_every_waiter(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock, events: Events) -> None:
    old = await _expired_and_held(manager, store, fake, alice, clock)
    fake.fail_next(1, 503, headers={"Retry-After": "9"})
    tasks = [asyncio.create_task(manager.lease(alice, "fake")) for _ in range(N)]
    await fake.wait_for_hits("token", 1)
    fake.release_tokens()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TokenEndpointUnavailable) for r in results), results[:3]
    assert {r.headers()["Retry-After"] for r in results} == {"9"}  # type: ignore[union-attr]
    assert len({id(r) for r in results}) == N  # each waiter raises its own error
    assert fake.hits["token"] == 1
    assert events.outcomes() == ["failed"]
    assert await store.get_connection(alice.id, "fake") == old


async def test_cancelled_first_caller_does_not_cancel_the_refresh(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    old = await _expired_and_held(manager, store, fake, alice, clock)
    first = asyncio.create_task(manager.lease(alice, "fake"))
    others = [asyncio.create_task(manager.lease(alice, "fake")) for _ in range(10)]
    await fake.wait_for_hits("token", 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    fake.release_tokens()
    leases = await asyncio.gather(*others)
    assert {lease.version for lease in leases} == {old.version + 1}
    assert fake.hits["token"] == 1


async def test_refresh_completes_and_persists_when_every_caller_is_gone(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    old = await _expired_and_held(manager, store, fake, alice, clock)
    tasks = [asyncio.create_task(manager.lease(alice, "fake")) for _ in range(5)]
    await fake.wait_for_hits("token", 1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    fake.release_tokens()
    await manager.close()  # waits for the running refresh instead of cutting it off
    stored = await store.get_connection(alice.id, "fake")
    assert stored is not None and stored.version == old.version + 1
    assert fake.is_valid_refresh_token(stored.tokens.refresh_token or "") == "alice"
    lease = await manager.lease(alice, "fake")  # and it is what the next request gets
    assert lease.access_token == stored.tokens.access_token
    assert fake.hits["token"] == 1


async def test_concurrent_rejections_cause_one_token_request(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    await connect(store, fake, alice, clock)
    lease = await manager.lease(alice, "fake")
    fake.hold_tokens()
    tasks = [asyncio.create_task(manager.rejected(alice, "fake", lease)) for _ in range(50)]
    await fake.wait_for_hits("token", 1)
    fake.release_tokens()
    new = await asyncio.gather(*tasks)
    assert {n.version if n else None for n in new} == {lease.version + 1}
    assert fake.hits["token"] == 1


async def test_client_credentials_first_fetch_is_single_flight(
        manager: TokenManager, fake: FakeAuthServer, alice: Identity) -> None:
    fake.hold_tokens()
    tasks = [asyncio.create_task(manager.lease(alice, "machine")) for _ in range(50)]
    await fake.wait_for_hits("token", 1)
    fake.release_tokens()
    leases = await asyncio.gather(*tasks)
    assert len({lease.access_token for lease in leases}) == 1
    assert fake.grants["client_credentials"] == 1


# --------------------------------------------------------------------------- several processes


async def test_two_processes_refreshing_concurrently_hit_the_endpoint_once(
        store: CountingStore, open_store: Callable[..., Any],
        make_manager: Callable[..., TokenManager], fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    store_b = await open_store()
    a, b = make_manager(store), make_manager(store_b)
    old = await connect(store, fake, alice, clock)
    await a.lease(alice, "fake")
    await b.lease(alice, "fake")
    clock.advance(3601)
    fake.hold_tokens()
    tasks = [asyncio.create_task(m.lease(alice, "fake")) for _ in range(50) for m in (a, b)]
    await fake.wait_for_hits("token", 1)
    fake.release_tokens()
    leases = await asyncio.gather(*tasks)
    assert fake.hits["token"] == 1
    assert {lease.version for lease in leases} == {old.version + 1}
    assert len({lease.access_token for lease in leases}) == 1


async def test_other_process_already_rotated_no_token_request(
        store: CountingStore, open_store: Callable[..., Any],
        make_manager: Callable[..., TokenManager], fake: FakeAuthServer, alice: Identity,
        clock: Clock, events: Events) -> None:
    """A holds a cached copy whose refresh token B has since rotated out; A must not send
    it (the provider would answer invalid_grant) but use what B stored."""
    a, b = make_manager(store), make_manager(await open_store())
    old = await connect(store, fake, alice, clock)
    await a.lease(alice, "fake")
    clock.advance(3600 - 20)
    by_b = await b.lease(alice, "fake")
    assert by_b.version == old.version + 1
    assert fake.is_valid_refresh_token(old.tokens.refresh_token or "") is None
    by_a = await a.lease(alice, "fake")
    assert by_a == by_b
    assert fake.hits["token"] == 1
    assert events.outcomes() == ["ok"]


async def test_invalid_grant_after_a_rotation_elsewhere_is_not_final(
        manager: TokenManager, store: CountingStore, open_store: Callable[..., Any],
        fake: FakeAuthServer, alice: Identity, clock: Clock, events: Events) -> None:
    """Our refresh token is rotated out while our request is on the wire (another instance
    that did not share our lock): invalid_grant, yet the store already holds a newer
    version, so nothing is marked and the newer token is used."""
    old = await _expired_and_held(manager, store, fake, alice, clock)
    task = asyncio.create_task(manager.lease(alice, "fake"))
    await fake.wait_for_hits("token", 1)
    # The other instance: rotates at the provider and stores its result.
    body = fake.issue_tokens("alice")
    fake.revoke_token(old.tokens.refresh_token or "")
    other = await (await open_store()).update_tokens(
        alice.id, "fake", old.version,
        old.tokens.__class__(access_token=body["access_token"],
                             refresh_token=body["refresh_token"],
                             expires_at=clock() + body["expires_in"]), clock())
    assert other is not None
    fake.release_tokens()
    lease = await task
    assert lease.access_token == body["access_token"] and lease.version == other.version
    stored = await store.get_connection(alice.id, "fake")
    assert stored is not None and stored.status == "active" and stored.version == other.version
    assert "reconsent_required" not in events.outcomes()
    assert fake.hits["token"] == 1


async def test_lock_not_acquired_is_unavailable_or_current(
        store: CountingStore, open_store: Callable[..., Any],
        make_manager: Callable[..., TokenManager], fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    manager = make_manager(store, lock_timeout=0.05)
    old = await connect(store, fake, alice, clock)
    holder = await open_store()
    async with holder.refresh_lock(alice.id, "fake", 1.0) as got:
        assert got
        clock.advance(3600 - 30)  # due but valid: keep serving it
        assert (await manager.lease(alice, "fake")).access_token == old.tokens.access_token
        clock.advance(31)
        with pytest.raises(TokenEndpointUnavailable) as info:
            await manager.lease(alice, "fake")
        assert info.value.headers()["Retry-After"] == "5"
    assert fake.hits["token"] == 0
    assert (await manager.lease(alice, "fake")).version == old.version + 1


async def test_consent_during_a_refresh_wins(manager: TokenManager, store: CountingStore,
                                             fake: FakeAuthServer, alice: Identity,
                                             clock: Clock) -> None:
    """The refresh's compare-and-set loses to a consent stored meanwhile: the refreshed
    tokens are dropped unused and everyone gets what the store holds."""
    await _expired_and_held(manager, store, fake, alice, clock)
    task = asyncio.create_task(manager.lease(alice, "fake"))
    await fake.wait_for_hits("token", 1)
    consent = await connect(store, fake, alice, clock)
    fake.release_tokens()
    lease = await task
    assert lease.access_token == consent.tokens.access_token
    assert await store.get_connection(alice.id, "fake") == consent


async def test_shutdown_cutting_a_refresh_off_is_unavailable_for_waiters(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    old = await _expired_and_held(manager, store, fake, alice, clock)
    tasks = [asyncio.create_task(manager.lease(alice, "fake")) for _ in range(3)]
    await fake.wait_for_hits("token", 1)
    await manager.close(grace=0.01)  # the endpoint never answers within the grace
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TokenEndpointUnavailable) for r in results), results
    assert await store.get_connection(alice.id, "fake") == old


async def test_rejection_joins_a_running_proactive_refresh(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    old = await connect(store, fake, alice, clock)
    lease = await manager.lease(alice, "fake")
    clock.advance(3600 - 10)
    fake.hold_tokens()
    proactive = asyncio.create_task(manager.lease(alice, "fake"))
    await fake.wait_for_hits("token", 1)
    rejected = asyncio.create_task(manager.rejected(alice, "fake", lease))
    fake.release_tokens()
    assert await rejected == await proactive
    assert (await proactive).version == old.version + 1
    assert fake.hits["token"] == 1
