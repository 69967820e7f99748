"""What only the SQLite backend has: files, pragmas, error mapping, script splitting, and
choosing a backend from the config."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import Config, StoreConfig
from gateway.errors import ConfigError, StoreUnavailable
from gateway.store import create_store
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore, split_script
from gateway.tokens.crypto import SecretBox

NOW = 1_700_000_000.0


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(secrets.token_bytes(32))


async def test_open_creates_folders_private_files_and_wal(tmp_path: Path, box: SecretBox) -> None:
    path = tmp_path / "a" / "b" / "gw.db"
    store = SqliteStore(path, box)
    await store.open()
    try:
        await store.create_identity("alice", None, NOW)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert store.locks_dir == tmp_path / "a" / "b" / "gw.db.locks"
        assert store.locks_dir.is_dir()
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        async with store.refresh_lock(1, "gh", 0) as held:
            assert held
            assert len([f for f in store.locks_dir.iterdir() if f.name != "open.lock"]) == 1
    finally:
        await store.close()


async def test_refresh_lock_survives_a_removed_lock_folder(tmp_path: Path,
                                                          box: SecretBox) -> None:
    store = SqliteStore(tmp_path / "gw.db", box)
    await store.open()
    try:
        shutil.rmtree(store.locks_dir)
        async with store.refresh_lock(1, "gh", 1.0) as held:
            assert held and store.locks_dir.is_dir()
    finally:
        await store.close()


async def test_locked_database_is_store_unavailable(tmp_path: Path, box: SecretBox) -> None:
    path = tmp_path / "gw.db"
    store = SqliteStore(path, box, busy_timeout=0.05)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.create_identity("alice", None, NOW)
        other.execute("ROLLBACK")
        assert (await store.create_identity("alice", None, NOW)).name == "alice"
    finally:
        other.close()
        await store.close()


async def test_cancelled_write_rolls_back_and_the_next_one_works(tmp_path: Path,
                                                                 box: SecretBox) -> None:
    path = tmp_path / "gw.db"
    store = SqliteStore(path, box)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the store's BEGIN now waits in SQLite's busy loop
        task = asyncio.create_task(store.create_identity("ghost", None, NOW))
        for _ in range(5):
            await asyncio.sleep(0)  # let it get wherever it gets; any point must be safe
        task.cancel()
        # Release first: a write cancelled inside BEGIN ends once its queued ROLLBACK ran.
        other.execute("ROLLBACK")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await store.create_identity("alice", None, NOW)).name == "alice"
        assert await store.get_identity("ghost") is None
    finally:
        other.close()
        await store.close()


async def test_not_a_database_is_store_unavailable(tmp_path: Path, box: SecretBox) -> None:
    path = tmp_path / "gw.db"
    path.write_bytes(b"this is not a database file" * 200)
    with pytest.raises(StoreUnavailable, match="not a database"):
        await SqliteStore(path, box).open()


async def test_uncreatable_folder_is_store_unavailable(tmp_path: Path, box: SecretBox) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnavailable, match="cannot create"):
        await SqliteStore(tmp_path / "file" / "gw.db", box).open()


def test_split_script() -> None:
    script = """
        -- a comment; with a semicolon
        CREATE TABLE t (a TEXT DEFAULT 'x;y');
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN
            UPDATE t SET a = 'z;'; SELECT 1;
        END;
        -- trailing comment
    """
    parts = split_script(script)
    assert len(parts) == 2
    assert parts[0].endswith("DEFAULT 'x;y');") and parts[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        split_script("CREATE TABLE t (a TEXT);\nCREATE TABLE u (b")


def test_create_store_picks_the_backend(write_config: Callable[..., Config],
                                        tmp_path: Path, box: SecretBox) -> None:
    cfg = write_config({"store": {"url": "sqlite:///data/gw.db"}})
    store = create_store(cfg.store, box)
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "data" / "gw.db"
    cfg = write_config({"store": {"url": "postgresql://gw@db.internal/gateway"}})
    assert isinstance(create_store(cfg.store, box), PostgresStore)
    with pytest.raises(ConfigError):
        create_store(StoreConfig(url="mysql://x", kind="mysql"), box)
    with pytest.raises(ConfigError):
        create_store(StoreConfig(url="sqlite:///", kind="sqlite", path=None), box)
