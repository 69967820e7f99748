"""Encryption at rest, on every backend: no plaintext secret in the database, tampering and
moved ciphertexts are detected, a wrong key cannot read, an old key still can (rotation)."""

from __future__ import annotations

import hashlib
import secrets

import pytest

from gateway.errors import DecryptionError
from gateway.store.base import PendingAuthorization, Store, TokenFields, WebSession
from gateway.tokens.crypto import SecretBox
from tests.store.conftest import Backend, StoreFactory

NOW = 1_700_000_000.0


def h(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def flip(blob: bytes, at: int = -1) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x01
    return bytes(b)


async def _blob(backend: Backend, column: str, identity_id: int, provider: str) -> bytes:
    rows = await backend.fetch(f"SELECT {column} FROM connections "
                               "WHERE identity_id = ? AND provider = ?", identity_id, provider)
    return bytes(rows[0][0])


async def _set_blob(backend: Backend, column: str, identity_id: int, provider: str,
                    blob: bytes) -> None:
    await backend.execute(f"UPDATE connections SET {column} = ? "
                          "WHERE identity_id = ? AND provider = ?", blob, identity_id, provider)


async def test_no_plaintext_secret_reaches_the_database(backend: Backend, box: SecretBox,
                                                        open_store: StoreFactory) -> None:
    marker = secrets.token_hex(8)
    secret = {name: f"{name}-{marker}" for name in
              ("access", "refresh", "verifier", "csrf", "apikey", "state", "session")}
    visible = f"visible-name-{marker}"
    store = await open_store(box)
    a = await store.create_identity(visible, None, NOW)
    await store.add_api_key(a.id, h(secret["apikey"]), "gwk_pref", NOW)
    await store.put_connection(a.id, "gh", TokenFields(secret["access"], secret["refresh"]),
                               None, NOW)
    await store.add_pending(PendingAuthorization(h(secret["state"]), a.id, "gh",
                                                 secret["verifier"], None, None, NOW, NOW + 60))
    await store.add_session(WebSession(h(secret["session"]), a.id, secret["csrf"], NOW, NOW,
                                       NOW + 60))

    def assert_clean(data: bytes) -> None:
        assert visible.encode() in data  # the scan does see the stored rows
        for name, value in secret.items():
            assert value.encode() not in data, f"{name} stored in plain text"
            assert value.encode().hex().encode() not in data.lower(), f"{name} stored as hex"

    if backend.kind == "sqlite":
        wal = store.path.with_name(store.path.name + "-wal")  # type: ignore[attr-defined]
        assert wal.stat().st_size > 0  # the rows are (at least partly) still in the WAL
    assert_clean(await backend.dump())
    await store.close()
    assert_clean(await backend.dump())  # after the checkpoint on close, too


async def test_flipped_byte_is_detected(backend: Backend, store: Store) -> None:
    a = await store.create_identity("alice", None, NOW)
    await store.put_connection(a.id, "gh", TokenFields("at-1", "rt-1"), None, NOW)
    await store.put_connection(a.id, "other", TokenFields("at-2"), None, NOW)
    for column, at in (("access_token", -1), ("refresh_token", 20), ("refresh_token", 1)):
        original = await _blob(backend, column, a.id, "gh")
        await _set_blob(backend, column, a.id, "gh", flip(original, at))
        with pytest.raises(DecryptionError):
            await store.get_connection(a.id, "gh")
        with pytest.raises(DecryptionError):
            await store.list_connections(a.id)
        await _set_blob(backend, column, a.id, "gh", original)
    assert (await store.get_connection(a.id, "gh")).tokens.refresh_token == "rt-1"  # type: ignore[union-attr]


async def test_ciphertexts_swapped_between_rows_are_detected(backend: Backend,
                                                             store: Store) -> None:
    a = await store.create_identity("alice", None, NOW)
    b = await store.create_identity("bob", None, NOW)
    await store.put_connection(a.id, "gh", TokenFields("alice-token"), None, NOW)
    await store.put_connection(b.id, "gh", TokenFields("bob-token"), None, NOW)
    blob_a = await _blob(backend, "access_token", a.id, "gh")
    blob_b = await _blob(backend, "access_token", b.id, "gh")
    await _set_blob(backend, "access_token", a.id, "gh", blob_b)
    await _set_blob(backend, "access_token", b.id, "gh", blob_a)
    for ident in (a, b):
        with pytest.raises(DecryptionError):
            await store.get_connection(ident.id, "gh")


async def test_ciphertext_moved_to_another_field_is_detected(backend: Backend,
                                                             store: Store) -> None:
    a = await store.create_identity("alice", None, NOW)
    await store.put_connection(a.id, "gh", TokenFields("at", "rt"), None, NOW)
    refresh = await _blob(backend, "refresh_token", a.id, "gh")
    await _set_blob(backend, "access_token", a.id, "gh", refresh)
    with pytest.raises(DecryptionError):
        await store.get_connection(a.id, "gh")


async def test_pending_and_session_secrets_are_bound_to_their_rows(backend: Backend,
                                                                   store: Store) -> None:
    a = await store.create_identity("alice", None, NOW)
    for label in ("s1", "s2"):
        await store.add_pending(PendingAuthorization(h(label), a.id, "gh", f"verifier-{label}",
                                                     None, None, NOW, NOW + 60))
        await store.add_session(WebSession(h(label), a.id, f"csrf-{label}", NOW, NOW, NOW + 60))
    rows = await backend.fetch("SELECT code_verifier FROM pending_authorizations "
                               "WHERE state_hash = ?", h("s2"))
    await backend.execute("UPDATE pending_authorizations SET code_verifier = ? "
                          "WHERE state_hash = ?", rows[0][0], h("s1"))
    with pytest.raises(DecryptionError):
        await store.take_pending(h("s1"), NOW)
    assert (await store.take_pending(h("s2"), NOW)).code_verifier == "verifier-s2"  # type: ignore[union-attr]

    rows = await backend.fetch("SELECT csrf_token FROM sessions WHERE id_hash = ?", h("s1"))
    await backend.execute("UPDATE sessions SET csrf_token = ? WHERE id_hash = ?",
                          flip(bytes(rows[0][0])), h("s1"))
    with pytest.raises(DecryptionError):
        await store.get_session(h("s1"), NOW)
    assert (await store.get_session(h("s2"), NOW)).csrf_token == "csrf-s2"  # type: ignore[union-attr]


async def test_wrong_key_cannot_read_and_old_key_still_can(open_store: StoreFactory,
                                                           box: SecretBox) -> None:
    first = await open_store(box)
    a = await first.create_identity("alice", None, NOW)
    await first.put_connection(a.id, "gh", TokenFields("at", "rt"), None, NOW)
    await first.close()

    wrong = await open_store(SecretBox(secrets.token_bytes(32)))
    with pytest.raises(DecryptionError):
        await wrong.get_connection(a.id, "gh")

    rotated = await open_store(SecretBox(secrets.token_bytes(32), old=[box.root_key]))
    conn = await rotated.get_connection(a.id, "gh")
    assert conn is not None and conn.tokens.access_token == "at"
