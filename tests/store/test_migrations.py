"""Versioned migrations, on every backend: fresh databases, upgrades that keep data, races."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import StoreUnavailable
from gateway.store._codec import load_migrations
from gateway.store.base import TokenFields
from gateway.tokens.crypto import SecretBox
from tests.store.conftest import Backend, StoreFactory

NOW = 1_700_000_000.0


async def _versions(backend: Backend) -> list[tuple[int, str]]:
    return [(int(v), str(n)) for v, n in
            await backend.fetch("SELECT version, name FROM schema_version ORDER BY version")]


def _expected() -> list[tuple[int, str]]:
    return [(m.version, m.name) for m in load_migrations("sqlite")]


async def _index_names(backend: Backend) -> set[str]:
    if backend.kind == "sqlite":
        rows = await backend.fetch("SELECT name FROM sqlite_master WHERE type = 'index'")
    else:
        rows = await backend.fetch("SELECT indexname FROM pg_indexes "
                                   "WHERE schemaname = current_schema()")
    return {r[0] for r in rows}


def test_both_dialects_have_the_same_migrations() -> None:
    sqlite_m, pg_m = load_migrations("sqlite"), load_migrations("postgres")
    assert [(m.version, m.name) for m in sqlite_m] == [(m.version, m.name) for m in pg_m]
    assert len(sqlite_m) >= 2 and all(m.sql.strip() for m in sqlite_m + pg_m)


async def test_empty_database_gets_every_migration(backend: Backend, box: SecretBox,
                                                   open_store: StoreFactory) -> None:
    await (await open_store(box)).close()
    assert await _versions(backend) == _expected()
    assert {"audit_at", "sessions_expires"} <= await _index_names(backend)


async def test_reopening_applies_nothing_again(backend: Backend, box: SecretBox,
                                               open_store: StoreFactory) -> None:
    await (await open_store(box)).close()
    applied = await backend.fetch("SELECT version, applied_at FROM schema_version")
    await (await open_store(box)).close()
    assert await backend.fetch("SELECT version, applied_at FROM schema_version") == applied
    assert await _versions(backend) == _expected()


async def test_upgrade_from_an_older_version_keeps_data(backend: Backend, box: SecretBox,
                                                        open_store: StoreFactory) -> None:
    await backend.migrate_to(1)
    assert await _versions(backend) == _expected()[:1]
    assert "audit_at" not in await _index_names(backend)
    await backend.execute("INSERT INTO identities (name, password_hash, created_at) "
                          "VALUES (?, ?, ?)", "veteran", "old-hash", NOW)
    await backend.execute("INSERT INTO audit_events (at, kind, outcome, identity) "
                          "VALUES (?, ?, ?, ?)", NOW, "key.created", "ok", "veteran")

    store = await open_store(box)
    assert await _versions(backend) == _expected()
    assert "audit_at" in await _index_names(backend)
    veteran = await store.get_identity("veteran")
    assert veteran is not None and veteran.password_hash == "old-hash"
    assert [e.kind for e in await store.list_audit(identity="veteran")] == ["key.created"]
    conn = await store.put_connection(veteran.id, "gh", TokenFields("at"), None, NOW)
    assert conn.version == 1


async def test_instances_starting_together_migrate_once(backend: Backend, box: SecretBox,
                                                        open_store: StoreFactory) -> None:
    stores = await asyncio.gather(*(open_store(box) for _ in range(3)))
    a = await stores[0].create_identity("alice", None, NOW)
    assert await stores[2].get_identity_by_id(a.id) == a
    assert await _versions(backend) == _expected()


async def test_a_newer_schema_is_refused(backend: Backend, box: SecretBox,
                                         open_store: StoreFactory) -> None:
    await (await open_store(box)).close()
    await backend.execute("INSERT INTO schema_version (version, name, applied_at) "
                          "VALUES (?, ?, ?)", 99, "from_the_future", NOW)
    store = backend.make(box)
    with pytest.raises(StoreUnavailable, match="version 99, newer"):
        await store.open()
    with pytest.raises(StoreUnavailable):  # and it did not half-open
        await store.ping()
