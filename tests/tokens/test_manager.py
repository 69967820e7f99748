"""TokenManager against the real SQLite store, fake authorization server and OAuthClient:
the cache, refresh outcomes, re-consent, client credentials, ``rejected`` and ``invalidate``.

Concurrency (single-flight, cancellation, several "processes") is in test_single_flight.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from yarl import URL

from gateway.errors import (
    ConsentRequired,
    ReconsentRequired,
    TokenEndpointUnavailable,
    UnknownProvider,
)
from gateway.store.base import Identity
from gateway.tokens.manager import EVENT_REFRESHED, TokenManager
from gateway.tokens.source import Lease
from tests.fakes.authserver import FakeAuthServer
from tests.tokens.conftest import Clock, CountingStore, Events, connect

pytestmark = pytest.mark.usefixtures("fake")


# --------------------------------------------------------------------------- hot path


async def test_warm_cache_reads_the_store_once(manager: TokenManager, store: CountingStore,
                                               fake: FakeAuthServer, alice: Identity,
                                               clock: Clock) -> None:
    conn = await connect(store, fake, alice, clock)
    first = await manager.lease(alice, "fake")
    assert store.reads == 1
    for _ in range(100):
        clock.advance(10)  # 1000 s of a 3600 s token: still fresh
        lease = await manager.lease(alice, "fake")
        assert lease == first
    assert store.reads == 1
    assert fake.hits["token"] == 0
    assert first.access_token == conn.tokens.access_token
    assert first.version == conn.version
    assert fake.is_valid_access_token(first.access_token) == "alice"


async def test_warm_cache_survives_a_closed_store(manager: TokenManager, store: CountingStore,
                                                  fake: FakeAuthServer, alice: Identity,
                                                  clock: Clock) -> None:
    await connect(store, fake, alice, clock)
    first = await manager.lease(alice, "fake")
    await store.close()
    assert await manager.lease(alice, "fake") == first


async def test_no_connection_is_consent_required(manager: TokenManager,
                                                 alice: Identity) -> None:
    with pytest.raises(ConsentRequired) as info:
        await manager.lease(alice, "fake")
    assert type(info.value) is ConsentRequired
    assert info.value.body()["provider"] == "fake"
    assert info.value.body()["connect_url"] is None


async def test_unknown_provider(manager: TokenManager, alice: Identity) -> None:
    with pytest.raises(UnknownProvider):
        await manager.lease(alice, "nope")
    with pytest.raises(UnknownProvider):
        await manager.rejected(alice, "nope", Lease("x"))


async def test_negative_skew_is_refused(store: CountingStore,
                                        make_manager: Callable[..., TokenManager]) -> None:
    with pytest.raises(ValueError, match="skew"):
        make_manager(store, skew=-1)


async def test_marked_connection_is_reconsent_required(manager: TokenManager,
                                                       store: CountingStore,
                                                       fake: FakeAuthServer, alice: Identity,
                                                       clock: Clock) -> None:
    await connect(store, fake, alice, clock)
    await store.set_status(alice.id, "fake", "reconsent_required", clock())
    for _ in range(2):  # not cached: each request asks the store, so a new consent shows up
        with pytest.raises(ReconsentRequired):
            await manager.lease(alice, "fake")
    assert store.reads == 2
    conn = await connect(store, fake, alice, clock)  # consent again (another worker)
    assert (await manager.lease(alice, "fake")).access_token == conn.tokens.access_token


# --------------------------------------------------------------------------- refresh outcomes


async def test_refresh_rotates_and_stores_before_use(manager: TokenManager,
                                                     store: CountingStore,
                                                     fake: FakeAuthServer, alice: Identity,
                                                     clock: Clock, events: Events) -> None:
    old = await connect(store, fake, alice, clock)
    clock.advance(3600 - 30)  # inside the 60 s skew
    lease = await manager.lease(alice, "fake")
    stored = await store.get_connection(alice.id, "fake")
    assert stored is not None and fake.hits["token"] == 1
    assert lease.access_token != old.tokens.access_token
    assert lease.access_token == stored.tokens.access_token
    assert lease.version == stored.version == old.version + 1
    assert stored.tokens.refresh_token not in (None, old.tokens.refresh_token)
    assert fake.is_valid_refresh_token(stored.tokens.refresh_token or "") == "alice"
    assert fake.is_valid_refresh_token(old.tokens.refresh_token or "") is None
    assert stored.tokens.expires_at == clock() + 3600
    assert events.calls == [(EVENT_REFRESHED, "alice", "fake", "ok")]
    sent = fake.requests[-1].params
    assert sent["grant_type"] == "refresh_token" and "scope" not in sent


async def test_refresh_without_new_refresh_token_keeps_the_old_one(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    old = await connect(store, fake, alice, clock)
    fake.omit_refresh_token = True
    clock.advance(3600)
    lease = await manager.lease(alice, "fake")
    stored = await store.get_connection(alice.id, "fake")
    assert stored is not None and lease.access_token == stored.tokens.access_token
    assert stored.tokens.refresh_token == old.tokens.refresh_token
    clock.advance(3600)  # and the kept one still works
    assert (await manager.lease(alice, "fake")).version == stored.version + 1


async def test_skew_is_clamped_to_half_a_short_lifetime(manager: TokenManager,
                                                        store: CountingStore,
                                                        fake: FakeAuthServer, alice: Identity,
                                                        clock: Clock) -> None:
    fake.expires_in = 60
    first = await connect(store, fake, alice, clock)
    clock.advance(1)
    assert (await manager.lease(alice, "fake")).access_token == first.tokens.access_token
    clock.advance(28)
    assert (await manager.lease(alice, "fake")).access_token == first.tokens.access_token
    assert fake.hits["token"] == 0
    clock.advance(1)  # t=+30: half the lifetime
    second = await manager.lease(alice, "fake")
    assert second.access_token != first.tokens.access_token and fake.hits["token"] == 1
    clock.advance(29)  # the new 60 s token is not refreshed at once either
    assert (await manager.lease(alice, "fake")) == second
    assert fake.hits["token"] == 1


async def test_invalid_grant_marks_reconsent_and_keeps_the_row(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock, events: Events) -> None:
    old = await connect(store, fake, alice, clock)
    fake.revoke_user("alice")
    clock.advance(3600)
    with pytest.raises(ReconsentRequired) as info:
        await manager.lease(alice, "fake")
    assert info.value.body()["provider"] == "fake"
    stored = await store.get_connection(alice.id, "fake")
    assert stored is not None and stored.status == "reconsent_required"
    assert stored.tokens == old.tokens
    assert events.outcomes() == ["reconsent_required"]
    with pytest.raises(ReconsentRequired):  # final: no more token requests
        await manager.lease(alice, "fake")
    assert fake.hits["token"] == 1


async def test_server_error_with_valid_token_uses_it_and_backs_off(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock, events: Events) -> None:
    old = await connect(store, fake, alice, clock)
    fake.fail_next(1, 500, headers={"Retry-After": "20"})
    clock.advance(3600 - 30)
    assert (await manager.lease(alice, "fake")).access_token == old.tokens.access_token
    assert events.outcomes() == ["failed"]
    clock.advance(10)  # still inside the provider's Retry-After: no new attempt
    assert (await manager.lease(alice, "fake")).access_token == old.tokens.access_token
    assert fake.hits["token"] == 1
    clock.advance(11)
    assert (await manager.lease(alice, "fake")).access_token != old.tokens.access_token
    assert fake.hits["token"] == 2
    stored = await store.get_connection(alice.id, "fake")
    assert stored is not None and stored.status == "active"


async def test_timeout_with_valid_token_uses_it(store: CountingStore, fake: FakeAuthServer,
                                                alice: Identity, clock: Clock,
                                                make_manager: Callable[..., TokenManager],
                                                ) -> None:
    manager = make_manager(store, timeout=0.2)
    old = await connect(store, fake, alice, clock)
    clock.advance(3600 - 30)
    fake.hold_tokens()  # the token endpoint never answers
    assert (await manager.lease(alice, "fake")).access_token == old.tokens.access_token
    assert await store.get_connection(alice.id, "fake") == old


@pytest.mark.parametrize(("headers", "expected"), [({"Retry-After": "17"}, "17"), ({}, "5")])
async def test_server_error_with_expired_token_is_unavailable(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock, headers: dict[str, str], expected: str) -> None:
    old = await connect(store, fake, alice, clock)
    fake.fail_next(1, 503, headers=headers)
    clock.advance(3601)
    with pytest.raises(TokenEndpointUnavailable) as info:
        await manager.lease(alice, "fake")
    assert info.value.status == 503
    assert info.value.headers()["Retry-After"] == expected
    body = str(info.value.body())
    assert old.tokens.refresh_token and old.tokens.refresh_token not in body
    assert old.tokens.access_token not in body
    assert await store.get_connection(alice.id, "fake") == old  # nothing lost
    assert (await manager.lease(alice, "fake")).version == old.version + 1  # it recovers


async def test_config_error_is_unavailable_and_keeps_tokens(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    old = await connect(store, fake, alice, clock)
    fake.fail_next(1, 401, '{"error":"invalid_client"}')
    clock.advance(3600 - 30)
    with pytest.raises(TokenEndpointUnavailable):
        await manager.lease(alice, "fake")
    assert await store.get_connection(alice.id, "fake") == old


async def test_no_refresh_token_used_until_expiry_then_reconsent(
        manager: TokenManager, store: CountingStore, fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    old = await connect(store, fake, alice, clock, refresh=False)
    clock.advance(3600 - 30)
    assert (await manager.lease(alice, "fake")).access_token == old.tokens.access_token
    clock.advance(30)
    with pytest.raises(ReconsentRequired):
        await manager.lease(alice, "fake")
    assert fake.hits["token"] == 0
    assert await store.get_connection(alice.id, "fake") == old  # nothing was refused: unmarked
    with pytest.raises(ReconsentRequired):  # an upstream 401 with no refresh token: re-consent
        await manager.rejected(alice, "fake", Lease(old.tokens.access_token, version=old.version))


async def test_hook_failure_does_not_break_a_refresh(store: CountingStore, fake: FakeAuthServer,
                                                     alice: Identity, clock: Clock,
                                                     make_manager: Callable[..., TokenManager],
                                                     ) -> None:
    def boom(*_: Any) -> None:
        raise RuntimeError("metrics are down")

    manager = make_manager(store, on_event=boom)
    await connect(store, fake, alice, clock)
    clock.advance(3600)
    lease = await manager.lease(alice, "fake")
    assert fake.is_valid_access_token(lease.access_token) == "alice"


async def test_instance_url_becomes_the_lease_upstream(manager: TokenManager,
                                                       store: CountingStore,
                                                       fake: FakeAuthServer, alice: Identity,
                                                       clock: Clock) -> None:
    await connect(store, fake, alice, clock)
    assert (await manager.lease(alice, "fake")).upstream is None
    fake.extra_token_fields = {"instance_url": "https://eu7.example.com"}
    clock.advance(3600)
    assert (await manager.lease(alice, "fake")).upstream == URL("https://eu7.example.com")
    fake.extra_token_fields = {"instance_url": "javascript:alert(1)"}
    clock.advance(3600)
    assert (await manager.lease(alice, "fake")).upstream is None


# --------------------------------------------------------------------------- client credentials


async def test_client_credentials_fetch_cache_and_renew(manager: TokenManager,
                                                        store: CountingStore,
                                                        fake: FakeAuthServer, alice: Identity,
                                                        clock: Clock) -> None:
    first = await manager.lease(alice, "machine")
    assert fake.grants["client_credentials"] == 1
    assert fake.is_valid_access_token(first.access_token) == fake.clients[
        "gateway-test"].client_id
    owner = await store.get_identity("_gateway")  # one token for the gateway, not per identity
    assert owner is not None
    stored = await store.get_connection(owner.id, "machine")
    assert stored is not None and stored.tokens.access_token == first.access_token
    assert stored.tokens.scopes == ("api",)
    clock.advance(1000)
    assert await manager.lease(alice, "machine") == first
    clock.advance(3600)
    second = await manager.lease(alice, "machine")
    assert second.access_token != first.access_token and second.version == first.version + 1
    assert fake.grants["client_credentials"] == 2 and fake.grants["refresh_token"] == 0


async def test_client_credentials_failure_is_unavailable(manager: TokenManager,
                                                         store: CountingStore,
                                                         fake: FakeAuthServer,
                                                         alice: Identity) -> None:
    fake.fail_next(1, 400, '{"error":"invalid_grant"}')  # never "re-consent" for a machine
    with pytest.raises(TokenEndpointUnavailable):
        await manager.lease(alice, "machine")
    assert await store.get_connection(alice.id, "machine") is None
    assert (await manager.lease(alice, "machine")).access_token


# --------------------------------------------------------------------------- rejected / invalidate


async def test_rejected_forces_one_refresh(manager: TokenManager, store: CountingStore,
                                           fake: FakeAuthServer, alice: Identity,
                                           clock: Clock) -> None:
    await connect(store, fake, alice, clock)
    lease = await manager.lease(alice, "fake")
    fake.expire_access_tokens("alice")  # the upstream now says 401
    new = await manager.rejected(alice, "fake", lease)
    assert new is not None and new.version == lease.version + 1
    assert fake.is_valid_access_token(new.access_token) == "alice"
    assert await manager.lease(alice, "fake") == new  # cached
    # A second 401 for the *old* lease (a request that was in flight) needs no new refresh.
    assert await manager.rejected(alice, "fake", lease) == new
    assert fake.hits["token"] == 1


async def test_rejected_after_invalid_grant_asks_for_reconsent(manager: TokenManager, store: CountingStore,
                                                    fake: FakeAuthServer, alice: Identity,
                                                    clock: Clock) -> None:
    await connect(store, fake, alice, clock)
    lease = await manager.lease(alice, "fake")
    fake.revoke_user("alice")
    with pytest.raises(ReconsentRequired):
        await manager.rejected(alice, "fake", lease)
    with pytest.raises(ReconsentRequired):
        await manager.lease(alice, "fake")
    assert (await store.get_connection(alice.id, "fake")).status == "reconsent_required"  # type: ignore[union-attr]


async def test_rejected_with_failing_endpoint_is_unavailable(manager: TokenManager,
                                                             store: CountingStore,
                                                             fake: FakeAuthServer,
                                                             alice: Identity,
                                                             clock: Clock) -> None:
    await connect(store, fake, alice, clock)
    lease = await manager.lease(alice, "fake")
    fake.fail_next(1, 502)
    with pytest.raises(TokenEndpointUnavailable):
        await manager.rejected(alice, "fake", lease)
    fake.fail_next(1, 401, '{"error":"invalid_client"}')
    assert await manager.rejected(alice, "fake", lease) is None
    assert (await manager.rejected(alice, "fake", lease)) is not None  # recovered


async def test_rejected_without_connection_asks_for_consent(manager: TokenManager,
                                                            alice: Identity) -> None:
    with pytest.raises(ConsentRequired):
        await manager.rejected(alice, "fake", Lease("gone", version=3))


async def test_invalidate_drops_the_cache(manager: TokenManager, store: CountingStore,
                                          fake: FakeAuthServer, alice: Identity,
                                          clock: Clock) -> None:
    await connect(store, fake, alice, clock)
    await manager.lease(alice, "fake")
    conn = await connect(store, fake, alice, clock)  # consent again
    manager.invalidate(alice.id, "fake")
    assert (await manager.lease(alice, "fake")).access_token == conn.tokens.access_token
    await store.delete_connection(alice.id, "fake")  # revoke
    manager.invalidate(alice.id)
    with pytest.raises(ConsentRequired):
        await manager.lease(alice, "fake")
    assert store.reads == 3


async def test_read_racing_an_invalidate_is_not_cached(manager: TokenManager,
                                                       store: CountingStore,
                                                       fake: FakeAuthServer, alice: Identity,
                                                       clock: Clock) -> None:
    old = await connect(store, fake, alice, clock)
    store.hold_answers.clear()
    task = asyncio.create_task(manager.lease(alice, "fake"))
    await store.reading.wait()  # the read has the old row in hand...
    new = await connect(store, fake, alice, clock)  # ...when consent replaces it
    manager.invalidate(alice.id, "fake")
    store.hold_answers.set()
    assert (await task).access_token == old.tokens.access_token  # it was current when asked
    assert (await manager.lease(alice, "fake")).access_token == new.tokens.access_token


async def test_rejected_uses_a_newer_version_another_process_stored(
        manager: TokenManager, store: CountingStore, open_store: Callable[..., Any],
        make_manager: Callable[..., TokenManager], fake: FakeAuthServer, alice: Identity,
        clock: Clock) -> None:
    await connect(store, fake, alice, clock)
    lease = await manager.lease(alice, "fake")
    other = make_manager(await open_store())
    await other.lease(alice, "fake")
    by_other = await other.rejected(alice, "fake", lease)  # the other worker saw a 401 first
    assert by_other is not None
    assert await manager.rejected(alice, "fake", lease) == by_other
    assert fake.hits["token"] == 1
