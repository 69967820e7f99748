"""Key rotation on every backend: ``reencrypt`` moves every secret to the current key in
batches, never overwrites a concurrent refresh, leaves unreadable rows alone, and
``server_secret`` keeps one value across instances and rotations."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.errors import BadRequest, DecryptionError
from gateway.oauth.client import OAuthClient
from gateway.store import _rekey
from gateway.store._sql import Executor, SqlStore
from gateway.store.base import PendingAuthorization, Store, TokenFields, WebSession
from gateway.tokens.crypto import SecretBox
from gateway.tokens.manager import TokenManager
from tests.fakes.authserver import start_auth_server
from tests.store.conftest import Backend, StoreFactory

NOW = 1_700_000_000.0
SECRET_COLUMNS = [("connections", "access_token"), ("connections", "refresh_token"),
                  ("pending_authorizations", "code_verifier"), ("sessions", "csrf_token"),
                  ("server_secrets", "value")]


def h(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def keys() -> tuple[bytes, bytes]:
    return secrets.token_bytes(32), secrets.token_bytes(32)


async def key_ids(backend: Backend) -> set[bytes]:
    """The key id of every stored ciphertext."""
    found: set[bytes] = set()
    for table, column in SECRET_COLUMNS:
        for (blob,) in await backend.fetch(f"SELECT {column} FROM {table} "
                                           f"WHERE {column} IS NOT NULL"):
            found.add(bytes(blob)[1:5])
    return found


async def seed(store: Store, marker: str, connections: int = 7) -> dict[str, str]:
    """Secrets of every kind; returns the plaintexts by label."""
    plain: dict[str, str] = {}
    a = await store.create_identity("alice", None, NOW)
    b = await store.create_identity("bob", None, NOW)
    for i in range(connections):
        owner = a if i % 2 else b
        refresh = f"rt{i}-{marker}" if i != 3 else None  # one without a refresh token
        await store.put_connection(owner.id, f"p{i}", TokenFields(f"at{i}-{marker}", refresh),
                                   None, NOW)
        plain[f"at{i}"], plain[f"rt{i}"] = f"at{i}-{marker}", refresh or ""
    for i in range(3):
        verifier = f"verifier{i}-{marker}" if i else None  # one without a verifier
        await store.add_pending(PendingAuthorization(h(f"state{i}"), a.id, "p0", verifier,
                                                     None, None, NOW, NOW + 3600))
        plain[f"verifier{i}"] = verifier or ""
    for i in range(2):
        await store.add_session(WebSession(h(f"sid{i}"), b.id, f"csrf{i}-{marker}", NOW, NOW,
                                           NOW + 3600))
        plain[f"csrf{i}"] = f"csrf{i}-{marker}"
    return plain


async def test_reencrypt_moves_every_secret_to_the_current_key(
        backend: Backend, open_store: StoreFactory) -> None:
    k1, k2 = keys()
    marker = secrets.token_hex(8)
    old = await open_store(SecretBox(k1))
    plain = await seed(old, marker)
    mac = await old.server_secret("hmac", b"m" * 32)
    versions = await backend.fetch("SELECT provider, version FROM connections ORDER BY provider")

    rotating = await open_store(SecretBox(k2, [k1]))
    # 7 connections + 2 pending with a verifier + 2 sessions + 1 server secret
    assert await rotating.count_stale_secrets() == 12
    report = await rotating.reencrypt(batch=3)
    assert (report.reencrypted, report.unreadable) == (12, 0)
    assert await rotating.count_stale_secrets() == 0
    assert await key_ids(backend) == {SecretBox(k2).key_id}
    assert (await rotating.reencrypt()).reencrypted == 0  # nothing left to do
    # Same plaintext, so no version moved: caches elsewhere stay valid.
    assert await backend.fetch("SELECT provider, version FROM connections "
                               "ORDER BY provider") == versions

    data = await backend.dump()
    for label, value in plain.items():
        assert not value or value.encode() not in data, f"{label} stored in plain text"

    new_only = await open_store(SecretBox(k2))  # the old key is gone now
    conns = {c.provider: c.tokens for c in await new_only.list_connections()}
    for i in range(7):
        assert conns[f"p{i}"].access_token == plain[f"at{i}"]
        assert (conns[f"p{i}"].refresh_token or "") == plain[f"rt{i}"]
    for i in range(3):
        pending = await new_only.take_pending(h(f"state{i}"), NOW)
        assert pending is not None and (pending.code_verifier or "") == plain[f"verifier{i}"]
    for i in range(2):
        session = await new_only.get_session(h(f"sid{i}"), NOW)
        assert session is not None and session.csrf_token == plain[f"csrf{i}"]
    assert await new_only.server_secret("hmac", b"x" * 32) == mac
    with pytest.raises(DecryptionError):  # and the old key alone reads nothing any more
        await (await open_store(SecretBox(k1))).list_connections()


async def test_rows_no_key_can_read_are_reported_and_left_alone(
        backend: Backend, open_store: StoreFactory) -> None:
    k0, k1 = keys()
    k2 = secrets.token_bytes(32)
    lost = await open_store(SecretBox(k0))
    a = await lost.create_identity("alice", None, NOW)
    await lost.put_connection(a.id, "lost", TokenFields("at-lost", "rt-lost"), None, NOW)
    kept = await open_store(SecretBox(k1))
    for name in ("a", "b", "c"):
        await kept.put_connection(a.id, name, TokenFields(f"at-{name}"), None, NOW)
    before = await backend.fetch("SELECT access_token FROM connections WHERE provider = ?",
                                 "lost")

    rotating = await open_store(SecretBox(k2, [k1]))  # k0 is not configured
    report = await rotating.reencrypt(batch=1)
    assert (report.reencrypted, report.unreadable) == (3, 1)
    assert await rotating.count_stale_secrets() == 1
    assert await backend.fetch("SELECT access_token FROM connections WHERE provider = ?",
                               "lost") == before
    assert (await rotating.get_connection(a.id, "b")).tokens.access_token == "at-b"  # type: ignore[union-attr]


@pytest.mark.parametrize("batch", [0, -1, True, 2.5])
async def test_bad_batch_sizes_are_refused(store: Store, batch: Any) -> None:
    with pytest.raises(BadRequest):
        await store.reencrypt(batch)


async def test_a_refresh_between_read_and_write_is_not_overwritten(
        backend: Backend, open_store: StoreFactory) -> None:
    """The rotation reads a row, a refresh (by an instance still on the old key) replaces its
    tokens, then the rotation writes: its compare-and-set must miss, and its next pass must
    re-encrypt the *new* tokens."""
    k1, k2 = keys()
    old_instance = await open_store(SecretBox(k1))
    a = await old_instance.create_identity("alice", None, NOW)
    first = await old_instance.put_connection(a.id, "gh", TokenFields("at-1", "rt-1"), None, NOW)
    rotating = await open_store(SecretBox(k2, [k1]))
    assert isinstance(rotating, SqlStore)
    raced = 0

    @asynccontextmanager
    async def write_after_a_refresh() -> AsyncIterator[Executor]:
        nonlocal raced
        if raced == 0:
            raced += 1
            stored = await old_instance.update_tokens(a.id, "gh", first.version,
                                                      TokenFields("at-2", "rt-2"), NOW + 1)
            assert stored is not None
        async with rotating._write() as db:
            yield db

    report = await _rekey.reencrypt(rotating._read, write_after_a_refresh,
                                    SecretBox(k2, [k1]), 10)
    assert report.reencrypted == 1 and raced == 1
    conn = await (await open_store(SecretBox(k2))).get_connection(a.id, "gh")
    assert conn is not None
    assert (conn.tokens.access_token, conn.tokens.refresh_token) == ("at-2", "rt-2")
    assert conn.version == first.version + 1  # the refresh's bump only


async def test_rotation_during_a_token_manager_refresh(
        backend: Backend, open_store: StoreFactory, aiohttp_server: Callable[..., Any]) -> None:
    """The refresh holds the refresh lock and waits on the token endpoint while the whole
    rotation runs; it then stores its tokens (rotation did not bump the version), once."""
    k1, k2 = keys()
    fake = await start_auth_server(aiohttp_server)
    seeded = await open_store(SecretBox(k1))
    alice = await seeded.create_identity("alice", None, NOW)
    body = fake.issue_tokens("alice")
    await seeded.put_connection(alice.id, "fake", TokenFields(body["access_token"],
                                                              body["refresh_token"],
                                                              expires_at=NOW), None, NOW)
    serving = await open_store(SecretBox(k2, [k1]))  # an instance restarted with the new key
    rotating = await open_store(SecretBox(k2, [k1]))  # `gateway rotate-key`
    async with aiohttp.ClientSession() as http:
        manager = TokenManager(serving, OAuthClient(http, timeout=10),
                               {"fake": fake.provider_config("fake",
                                                             upstream=URL("http://127.0.0.1:9"))})
        fake.hold_tokens()
        lease = asyncio.create_task(manager.lease(alice, "fake"))
        await fake.wait_for_hits("token", 1)  # refreshing: lock held, row read
        report = await rotating.reencrypt(batch=1)
        assert report.reencrypted == 1 and await rotating.count_stale_secrets() == 0
        fake.release_tokens()
        got = await lease
        await manager.close()
    assert fake.hits["token"] == 1
    assert fake.is_valid_access_token(got.access_token) == "alice"
    conn = await (await open_store(SecretBox(k2))).get_connection(alice.id, "fake")
    assert conn is not None and conn.tokens.access_token == got.access_token
    assert conn.tokens.refresh_token is not None
    assert fake.is_valid_refresh_token(conn.tokens.refresh_token) == "alice"
    assert await key_ids(backend) == {SecretBox(k2).key_id}
    data = await backend.dump()
    for token in (body["access_token"], body["refresh_token"], got.access_token,
                  conn.tokens.refresh_token):
        assert token.encode() not in data


# --------------------------------------------------------------------------- server secrets


async def test_server_secret_first_writer_wins_everywhere(
        backend: Backend, open_store: StoreFactory) -> None:
    k1, k2 = keys()
    stores = [await open_store(SecretBox(k1)) for _ in range(3)]
    values = await asyncio.gather(*(s.server_secret("hmac", bytes([i]) * 32)
                                    for i, s in enumerate(stores)))
    assert len(set(values)) == 1 and values[0] in {bytes([i]) * 32 for i in range(3)}
    assert await stores[0].server_secret("other", b"o" * 16) == b"o" * 16  # names are separate
    assert values[0].hex().encode() not in await backend.dump()

    rotating = await open_store(SecretBox(k2, [k1]))
    assert (await rotating.reencrypt()).reencrypted == 2
    assert await (await open_store(SecretBox(k2))).server_secret("hmac", b"z" * 32) == values[0]


@pytest.mark.parametrize(("name", "initial"), [("", b"x" * 32), ("n", b"short"),
                                               ("n", "x" * 32), (None, b"x" * 32)])
async def test_server_secret_bad_input(store: Store, backend: Backend, name: Any,
                                       initial: Any) -> None:
    with pytest.raises(BadRequest):
        await store.server_secret(name, initial)
    assert await backend.count("server_secrets") == 0
