"""What only the PostgreSQL backend has: placeholder rewriting, outages, and the advisory
lock dying with its session."""

from __future__ import annotations

import secrets

import asyncpg
import pytest
from yarl import URL

from gateway.errors import StoreUnavailable
from gateway.store._locks import lock_key64
from gateway.store.postgres import PostgresStore, to_dollar
from gateway.tokens.crypto import SecretBox
from tests.store.conftest import Backend, pg_admin_url


def test_to_dollar() -> None:
    assert to_dollar("SELECT ? , ?,?") == "SELECT $1 , $2,$3"
    assert to_dollar("SELECT 1") == "SELECT 1"


async def test_unreachable_server_is_store_unavailable() -> None:
    box = SecretBox(secrets.token_bytes(32))
    store = PostgresStore("postgresql://nobody:s3cret-pw@127.0.0.1:1/none", box, timeout=2)
    with pytest.raises(StoreUnavailable, match="cannot connect") as info:
        await store.open()
    assert "s3cret-pw" not in str(info.value)
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.get_identity("alice")


@pytest.mark.postgres
async def test_unknown_database_is_store_unavailable() -> None:
    url = str(URL(await pg_admin_url()).with_path(f"/no_such_db_{secrets.token_hex(4)}"))
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await PostgresStore(url, SecretBox(secrets.token_bytes(32))).open()


@pytest.mark.postgres
async def test_advisory_lock_ends_with_its_session(pg_backend: Backend) -> None:
    box = SecretBox(secrets.token_bytes(32))
    store, other = pg_backend.make(box), pg_backend.make(box)
    await store.open()
    await other.open()
    admin = await asyncpg.connect(await pg_admin_url())
    try:
        async with store.refresh_lock(9, "gh", 5.0) as held:
            assert held
            async with other.refresh_lock(9, "gh", 0.05) as second:
                assert second is False
            # An operator (or a network failure) ends the holder's session mid-lock.
            schema = (await pg_backend.fetch("SELECT current_schema()"))[0][0]
            key = lock_key64(9, "gh", schema) & 0xFFFF_FFFF_FFFF_FFFF
            pids = await admin.fetch(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 1",
                key >> 32, key & 0xFFFF_FFFF)
            assert len(pids) == 1
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pids[0]["pid"])
            async with other.refresh_lock(9, "gh", 5.0) as third:
                assert third is True
        # Leaving the first block with a dead session must not raise, nor leave a lock.
        async with store.refresh_lock(9, "gh", 5.0) as again:
            assert again is True
    finally:
        await admin.close()
        await store.close()
        await other.close()
