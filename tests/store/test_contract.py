"""The Store contract, run against every backend (see conftest.py for the ``backend`` fixture)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from gateway.errors import BadRequest, StoreUnavailable
from gateway.store.base import (
    AuditEvent,
    Identity,
    PendingAuthorization,
    Store,
    TokenFields,
    WebSession,
)
from gateway.tokens.crypto import SecretBox
from tests.store.conftest import Backend, StoreFactory

NOW = 1_700_000_000.0


def h(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def tokens(tag: str = "1", refresh: bool = True, **kw: object) -> TokenFields:
    return TokenFields(access_token=f"access-{tag}", refresh_token=f"refresh-{tag}" if refresh
                       else None, **kw)  # type: ignore[arg-type]


def pending(label: str, identity_id: int, expires_at: float = NOW + 600,
            verifier: str | None = "verifier-xyz") -> PendingAuthorization:
    return PendingAuthorization(state_hash=h(label), identity_id=identity_id, provider="gh",
                                code_verifier=verifier, nonce="n-" + label, return_to="/back",
                                created_at=NOW, expires_at=expires_at)


def session(label: str, identity_id: int, expires_at: float = NOW + 3600) -> WebSession:
    return WebSession(id_hash=h(label), identity_id=identity_id, csrf_token="csrf-" + label,
                      created_at=NOW, last_seen_at=NOW, expires_at=expires_at)


async def alice(store: Store) -> Identity:
    return await store.create_identity("alice", "pw-hash", NOW)


# --------------------------------------------------------------------------- identities


async def test_identities(store: Store) -> None:
    a = await store.create_identity("alice", "hash-a", NOW)
    b = await store.create_identity("bob", None, NOW + 1)
    assert (a.name, a.password_hash, a.created_at) == ("alice", "hash-a", NOW)
    assert a.id != b.id
    assert await store.get_identity("alice") == a
    assert await store.get_identity_by_id(b.id) == b
    assert await store.get_identity("carol") is None
    assert await store.get_identity_by_id(b.id + 1000) is None
    assert [i.name for i in await store.list_identities()] == ["alice", "bob"]

    assert await store.set_password("bob", "hash-b") is True
    assert (await store.get_identity("bob")).password_hash == "hash-b"  # type: ignore[union-attr]
    assert await store.set_password("carol", "x") is False

    assert await store.delete_identity("bob") is True
    assert await store.delete_identity("bob") is False
    assert [i.name for i in await store.list_identities()] == ["alice"]


async def test_duplicate_identity_is_bad_request_and_changes_nothing(store: Store) -> None:
    a = await store.create_identity("alice", "hash-a", NOW)
    with pytest.raises(BadRequest, match="already exists"):
        await store.create_identity("alice", "other", NOW + 5)
    with pytest.raises(BadRequest):
        await store.create_identity("", None, NOW)
    assert await store.list_identities() == [a]


async def test_delete_identity_cascades(backend: Backend, store: Store) -> None:
    a = await alice(store)
    keep = await store.create_identity("bob", None, NOW)
    for ident in (a, keep):
        await store.add_api_key(ident.id, h(f"key-{ident.name}"), "gwk_" + ident.name, NOW)
        await store.put_connection(ident.id, "gh", tokens(ident.name), None, NOW)
        await store.add_pending(pending(f"state-{ident.name}", ident.id))
        await store.add_session(session(f"sess-{ident.name}", ident.id))
    await store.add_audit(AuditEvent(at=NOW, kind="key.created", outcome="ok", identity="alice"))

    assert await store.delete_identity("alice") is True
    for table in ("api_keys", "connections", "pending_authorizations", "sessions"):
        assert await backend.count(table, "identity_id = ?", a.id) == 0, table
        assert await backend.count(table, "identity_id = ?", keep.id) == 1, table
    assert await store.find_api_key(h("key-alice")) is None
    assert await store.take_pending(h("state-alice"), NOW) is None
    assert len(await store.list_audit(identity="alice")) == 1  # the audit trail outlives it


# --------------------------------------------------------------------------- API keys


async def test_api_keys(store: Store) -> None:
    a = await alice(store)
    b = await store.create_identity("bob", None, NOW)
    k1 = await store.add_api_key(a.id, h("k1"), "gwk_AAAA", NOW)
    k2 = await store.add_api_key(a.id, h("k2"), "gwk_BBBB", NOW + 1)
    kb = await store.add_api_key(b.id, h("kb"), "gwk_AAAA", NOW)
    assert (k1.identity_id, k1.prefix, k1.created_at, k1.last_used_at, k1.revoked_at) == (
        a.id, "gwk_AAAA", NOW, None, None)

    found = await store.find_api_key(h("k1"))
    assert found is not None and found[0] == k1 and found[1] == a
    assert await store.find_api_key(h("unknown")) is None
    assert [k.id for k in await store.list_api_keys(a.id)] == [k1.id, k2.id]

    assert await store.revoke_api_key(a.id, "gwk_AAAA", NOW + 2) is True
    assert await store.revoke_api_key(a.id, "gwk_AAAA", NOW + 3) is False  # already revoked
    assert await store.revoke_api_key(a.id, "gwk_ZZZZ", NOW + 3) is False
    assert await store.find_api_key(h("k1")) is None
    assert await store.find_api_key(h("kb")) is not None  # bob's key with the same prefix stays
    listed = {k.id: k for k in await store.list_api_keys(a.id)}
    assert listed[k1.id].revoked_at == NOW + 2 and listed[k2.id].revoked_at is None
    assert kb.revoked_at is None


async def test_touch_api_keys_batches_and_only_moves_forward(store: Store) -> None:
    a = await alice(store)
    k1 = await store.add_api_key(a.id, h("k1"), "gwk_1", NOW)
    k2 = await store.add_api_key(a.id, h("k2"), "gwk_2", NOW)
    await store.touch_api_keys({})
    await store.touch_api_keys({k1.id: NOW + 10, k2.id: NOW + 20, 999_999: NOW})
    await store.touch_api_keys({k1.id: NOW + 5})  # a late, older batch
    used = {k.id: k.last_used_at for k in await store.list_api_keys(a.id)}
    assert used == {k1.id: NOW + 10, k2.id: NOW + 20}


async def test_api_key_bad_input(store: Store) -> None:
    a = await alice(store)
    await store.add_api_key(a.id, h("k1"), "gwk_1", NOW)
    with pytest.raises(BadRequest, match="already registered"):
        await store.add_api_key(a.id, h("k1"), "gwk_2", NOW)
    with pytest.raises(BadRequest, match="no such identity"):
        await store.add_api_key(a.id + 1000, h("k3"), "gwk_3", NOW)
    assert len(await store.list_api_keys(a.id)) == 1


# --------------------------------------------------------------------------- connections


async def test_put_and_get_connection(store: Store) -> None:
    a = await alice(store)
    t = tokens("1", expires_at=NOW + 3600, scopes=("read", "write"),
               extra={"instance_url": "https://eu.example"})
    c = await store.put_connection(a.id, "gh", t, "acct-1", NOW)
    assert c.tokens == t
    assert (c.identity_id, c.provider, c.account_id, c.status, c.version) == (
        a.id, "gh", "acct-1", "active", 1)
    assert (c.created_at, c.updated_at, c.refreshed_at) == (NOW, NOW, None)
    assert await store.get_connection(a.id, "gh") == c
    assert await store.get_connection(a.id, "other") is None


async def test_put_connection_replaces_atomically_and_reactivates(store: Store) -> None:
    a = await alice(store)
    await store.put_connection(a.id, "gh", tokens("1"), "acct-1", NOW)
    await store.set_status(a.id, "gh", "reconsent_required", NOW + 1)
    c = await store.put_connection(a.id, "gh", tokens("2", refresh=False), "acct-2", NOW + 2)
    assert c.tokens == tokens("2", refresh=False)  # a new grant replaces the refresh token too
    assert (c.status, c.version, c.account_id) == ("active", 3, "acct-2")
    assert (c.created_at, c.updated_at) == (NOW, NOW + 2)
    assert await store.list_connections(a.id) == [c]


async def test_list_and_delete_connections(store: Store) -> None:
    a = await alice(store)
    b = await store.create_identity("bob", None, NOW)
    await store.put_connection(b.id, "gh", tokens("b"), None, NOW)
    await store.put_connection(a.id, "zz", tokens("az"), None, NOW)
    await store.put_connection(a.id, "gh", tokens("ag"), None, NOW)
    assert [(c.identity_id, c.provider) for c in await store.list_connections()] == [
        (a.id, "gh"), (a.id, "zz"), (b.id, "gh")]
    assert [c.provider for c in await store.list_connections(a.id)] == ["gh", "zz"]
    assert await store.delete_connection(a.id, "gh") is True
    assert await store.delete_connection(a.id, "gh") is False
    assert [c.provider for c in await store.list_connections(a.id)] == ["zz"]


async def test_update_tokens_is_compare_and_set(store: Store) -> None:
    a = await alice(store)
    await store.put_connection(a.id, "gh", tokens("1", scopes=("x",)), "acct", NOW)
    new = tokens("2", refresh=False, expires_at=NOW + 60)
    c = await store.update_tokens(a.id, "gh", 1, new, NOW + 5)
    assert c is not None and c.version == 2
    assert c.tokens.access_token == "access-2" and c.tokens.expires_at == NOW + 60
    assert c.tokens.refresh_token == "refresh-1"  # kept: the server issued no new one (§6)
    assert (c.refreshed_at, c.updated_at, c.account_id) == (NOW + 5, NOW + 5, "acct")

    assert await store.update_tokens(a.id, "gh", 1, tokens("stale"), NOW + 6) is None
    assert await store.update_tokens(a.id, "nope", 1, tokens("x"), NOW + 6) is None
    assert await store.get_connection(a.id, "gh") == c

    rotated = await store.update_tokens(a.id, "gh", 2, tokens("3"), NOW + 7)
    assert rotated is not None and rotated.tokens.refresh_token == "refresh-3"
    assert rotated.version == 3


async def test_concurrent_cas_from_two_instances_has_one_winner(store: Store,
                                                                other_store: Store) -> None:
    a = await alice(store)
    await store.put_connection(a.id, "gh", tokens("1"), None, NOW)
    results = await asyncio.gather(*(
        s.update_tokens(a.id, "gh", 1, tokens(f"w{i}"), NOW + 1)
        for i, s in enumerate([store, other_store] * 4)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0].version == 2
    assert await other_store.get_connection(a.id, "gh") == winners[0]


async def test_set_status(store: Store) -> None:
    a = await alice(store)
    await store.put_connection(a.id, "gh", tokens("1"), None, NOW)
    c = await store.set_status(a.id, "gh", "reconsent_required", NOW + 1)
    assert c is not None and (c.status, c.version, c.updated_at) == ("reconsent_required", 2,
                                                                     NOW + 1)
    assert c.tokens == tokens("1")
    assert await store.set_status(a.id, "none", "active", NOW) is None
    with pytest.raises(BadRequest):
        await store.set_status(a.id, "gh", "bogus", NOW)  # type: ignore[arg-type]
    assert await store.get_connection(a.id, "gh") == c


@pytest.mark.parametrize("bad", [
    TokenFields(access_token=""),
    TokenFields(access_token="a", refresh_token=""),
    TokenFields(access_token="a", token_type=""),
    TokenFields(access_token="a", expires_at=float("nan")),
    TokenFields(access_token="a", extra={"k": 1}),  # type: ignore[dict-item]
])
async def test_bad_tokens_change_nothing(store: Store, bad: TokenFields) -> None:
    a = await alice(store)
    good = await store.put_connection(a.id, "gh", tokens("1"), None, NOW)
    with pytest.raises(BadRequest):
        await store.put_connection(a.id, "gh", bad, None, NOW + 1)
    with pytest.raises(BadRequest):
        await store.update_tokens(a.id, "gh", 1, bad, NOW + 1)
    assert await store.get_connection(a.id, "gh") == good


async def test_connection_for_unknown_identity_is_bad_request(store: Store) -> None:
    with pytest.raises(BadRequest, match="no such identity"):
        await store.put_connection(4242, "gh", tokens("1"), None, NOW)
    assert await store.list_connections() == []


# --------------------------------------------------------------------------- pending & links


async def test_pending_is_single_use(store: Store) -> None:
    a = await alice(store)
    p = pending("s1", a.id)
    await store.add_pending(p)
    await store.add_pending(pending("s2", a.id, verifier=None))
    assert await store.count_pending(a.id, NOW) == 2
    assert await store.take_pending(h("s1"), NOW + 1) == p
    assert await store.take_pending(h("s1"), NOW + 1) is None
    assert await store.take_pending(h("unknown"), NOW + 1) is None
    taken = await store.take_pending(h("s2"), NOW + 1)
    assert taken is not None and taken.code_verifier is None
    assert await store.count_pending(a.id, NOW) == 0


async def test_pending_expiry(backend: Backend, store: Store) -> None:
    a = await alice(store)
    b = await store.create_identity("bob", None, NOW)
    await store.add_pending(pending("old", a.id, expires_at=NOW + 10))
    await store.add_pending(pending("new", a.id, expires_at=NOW + 100))
    await store.add_pending(pending("bobs", b.id))
    assert await store.count_pending(a.id, NOW + 10) == 1  # expiry is exclusive
    assert await store.take_pending(h("old"), NOW + 10) is None
    assert await backend.count("pending_authorizations", "identity_id = ?", a.id) == 1
    assert await store.take_pending(h("old"), NOW) is None  # consumed, even though expired


async def test_pending_bad_input(store: Store) -> None:
    a = await alice(store)
    await store.add_pending(pending("s1", a.id))
    with pytest.raises(BadRequest, match="already pending"):
        await store.add_pending(pending("s1", a.id, verifier="other"))
    with pytest.raises(BadRequest, match="no such identity"):
        await store.add_pending(pending("s2", a.id + 1000))
    assert (await store.take_pending(h("s1"), NOW)).code_verifier == "verifier-xyz"  # type: ignore[union-attr]


async def test_take_pending_races_across_instances(store: Store, other_store: Store) -> None:
    a = await alice(store)
    await store.add_pending(pending("s1", a.id))
    results = await asyncio.gather(*(s.take_pending(h("s1"), NOW)
                                     for s in [store, other_store] * 5))
    assert sum(r is not None for r in results) == 1


async def test_use_link_is_single_use(store: Store, other_store: Store) -> None:
    assert await store.use_link(h("l1"), NOW + 60, NOW) is True
    assert await store.use_link(h("l1"), NOW + 60, NOW) is False
    assert await other_store.use_link(h("l1"), NOW + 60, NOW) is False
    assert await store.use_link(h("expired"), NOW, NOW) is False
    results = await asyncio.gather(*(s.use_link(h("l2"), NOW + 60, NOW)
                                     for s in [store, other_store] * 5))
    assert results.count(True) == 1


# --------------------------------------------------------------------------- sessions


async def test_sessions(store: Store) -> None:
    a = await alice(store)
    s = session("s1", a.id, expires_at=NOW + 100)
    await store.add_session(s)
    assert await store.get_session(h("s1"), NOW) == s
    assert await store.get_session(h("s1"), NOW + 100) is None  # expired
    assert await store.get_session(h("other"), NOW) is None

    await store.touch_session(h("s1"), NOW + 50)
    await store.touch_session(h("s1"), NOW + 20)  # never moves back
    got = await store.get_session(h("s1"), NOW + 60)
    assert got is not None and got.last_seen_at == NOW + 50 and got.csrf_token == "csrf-s1"

    await store.delete_session(h("s1"))
    await store.delete_session(h("s1"))
    assert await store.get_session(h("s1"), NOW) is None


async def test_session_bad_input(store: Store) -> None:
    a = await alice(store)
    await store.add_session(session("s1", a.id))
    with pytest.raises(BadRequest, match="already in use"):
        await store.add_session(session("s1", a.id))
    with pytest.raises(BadRequest, match="no such identity"):
        await store.add_session(session("s2", a.id + 1000))
    with pytest.raises(BadRequest):
        await store.add_session(WebSession(id_hash=h("s3"), identity_id=a.id, csrf_token=""))
    assert await store.get_session(h("s2"), NOW) is None


# --------------------------------------------------------------------------- audit & purge


async def test_audit_filters(store: Store) -> None:
    for i, who in enumerate(["alice", "bob", "alice", None, "alice"]):
        await store.add_audit(AuditEvent(at=NOW + i, kind="connection.refreshed", outcome="ok",
                                         identity=who, provider="gh", detail=f"#{i}"))
    everything = await store.list_audit()
    assert [e.detail for e in everything] == ["#4", "#3", "#2", "#1", "#0"]  # newest first
    assert everything[0].id > everything[-1].id and everything[0].at == NOW + 4
    assert [e.detail for e in await store.list_audit(identity="alice")] == ["#4", "#2", "#0"]
    assert [e.detail for e in await store.list_audit(since=NOW + 2)] == ["#4", "#3", "#2"]
    assert [e.detail for e in await store.list_audit(identity="alice", since=NOW + 1,
                                                     limit=1)] == ["#4"]
    assert await store.list_audit(limit=0) == []
    assert await store.list_audit(identity="nobody") == []
    with pytest.raises(BadRequest):
        await store.list_audit(limit=-1)


async def test_purge_expired(backend: Backend, store: Store) -> None:
    a = await alice(store)
    for label, exp in (("old", NOW + 10), ("new", NOW + 100)):
        await store.add_pending(pending(label, a.id, expires_at=exp))
        await store.add_session(session(label, a.id, expires_at=exp))
        assert await store.use_link(h(label), exp, NOW)
    await store.add_audit(AuditEvent(at=NOW + 1, kind="k", outcome="ok", detail="old"))
    await store.add_audit(AuditEvent(at=NOW + 50, kind="k", outcome="ok", detail="new"))

    await store.purge_expired(NOW + 50)
    for table in ("pending_authorizations", "sessions", "used_links"):
        assert await backend.count(table) == 1, table
    assert await backend.count("audit_events") == 2  # no audit_before: audit untouched
    assert await store.get_session(h("new"), NOW + 50) is not None
    assert await store.use_link(h("new"), NOW + 100, NOW + 50) is False

    await store.purge_expired(NOW + 50, audit_before=NOW + 20)
    assert [e.detail for e in await store.list_audit()] == ["new"]


# --------------------------------------------------------------------------- lifecycle


async def test_ping_and_closed_store(backend: Backend, box: SecretBox) -> None:
    s = backend.make(box)
    with pytest.raises(StoreUnavailable):
        await s.ping()
    try:
        await s.open()
        await s.open()  # idempotent
        await s.ping()
    finally:
        await s.close()
    await s.close()
    with pytest.raises(StoreUnavailable):
        await s.get_identity("alice")
    with pytest.raises(StoreUnavailable):
        async with s.refresh_lock(1, "gh", 1.0):
            pass


async def test_reopen_keeps_data(open_store: StoreFactory, box: SecretBox) -> None:
    s = await open_store(box)
    a = await alice(s)
    await s.put_connection(a.id, "gh", tokens("1"), None, NOW)
    await s.close()
    s2 = await open_store(box)
    assert (await s2.get_connection(a.id, "gh")).tokens == tokens("1")  # type: ignore[union-attr]
