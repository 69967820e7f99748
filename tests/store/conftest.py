"""Fixtures for the store contract suite: every test runs against SQLite and PostgreSQL.

PostgreSQL comes from ``GATEWAY_TEST_POSTGRES_URL`` (default: the local server, user
``postgres``, falling back to the OS user). Each test gets a fresh schema, selected through the
URL's ``search_path`` server setting and dropped afterwards. Without a reachable server the
PostgreSQL variants are skipped, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest
from yarl import URL

from gateway.store import postgres, sqlite
from gateway.store._codec import load_migrations
from gateway.store.base import Store
from gateway.tokens.crypto import SecretBox

REPO = Path(__file__).resolve().parents[2]
HOLDER = Path(__file__).with_name("lock_holder.py")
PG_ENV = "GATEWAY_TEST_POSTGRES_URL"
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"

_pg_probe: dict[str, str] = {}  # "url": a working admin URL, or "error": why there is none


def _redact(url: str) -> str:
    u = URL(url)
    return str(u.with_password("***")) if u.password else url


async def pg_admin_url() -> str:
    """A URL that reaches the test server; skips (or fails under CI) when none does."""
    if not _pg_probe:
        candidates = [os.environ.get(PG_ENV) or PG_DEFAULT]
        if not os.environ.get(PG_ENV):
            candidates.append(str(URL(PG_DEFAULT).with_user(getpass.getuser())))
        errors = []
        for url in candidates:
            try:
                conn = await asyncpg.connect(url, timeout=3)
            except Exception as e:
                errors.append(f"{_redact(url)}: {type(e).__name__}: {e}")
                continue
            await conn.close()
            _pg_probe["url"] = url
            break
        else:
            _pg_probe["error"] = "; ".join(errors)
    if "url" not in _pg_probe:
        reason = f"no PostgreSQL server reachable (set {PG_ENV}): {_pg_probe['error']}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return _pg_probe["url"]


@dataclass
class Backend:
    """One database under test, plus raw access to it for inspection and tampering."""

    kind: str  # "sqlite" | "postgres"
    make: Callable[[SecretBox], Store]  # a new, unopened store on this database
    fetch: Callable[..., Awaitable[list[tuple[Any, ...]]]]  # raw SQL, ? placeholders
    execute: Callable[..., Awaitable[None]]
    migrate_to: Callable[[int], Awaitable[None]]  # apply migrations 1..n only
    dump: Callable[[], Awaitable[bytes]]  # everything stored, as the database holds it
    holder_spec: dict[str, Any]  # how tests/store/lock_holder.py opens the same store

    async def count(self, table: str, where: str = "1 = 1", *args: Any) -> int:
        rows = await self.fetch(f"SELECT COUNT(*) FROM {table} WHERE {where}", *args)
        return int(rows[0][0])


def _sqlite_backend(path: Path) -> Backend:
    async def fetch(sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async with aiosqlite.connect(path, isolation_level=None) as db:
            return [tuple(r) for r in await db.execute_fetchall(sql, args)]

    async def execute(sql: str, *args: Any) -> None:
        async with aiosqlite.connect(path, isolation_level=None) as db:
            await db.execute(sql, args)

    async def migrate_to(version: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        async with aiosqlite.connect(path, isolation_level=None) as db:
            await sqlite.apply_migrations(db, load_migrations("sqlite")[:version])

    async def dump() -> bytes:
        files = [path, path.with_name(path.name + "-wal")]
        return b"".join(f.read_bytes() for f in files if f.exists())

    return Backend("sqlite", lambda box: sqlite.SqliteStore(path, box), fetch, execute,
                   migrate_to, dump, {"kind": "sqlite", "path": str(path)})


def _pg_backend(url: str) -> Backend:
    async def fetch(sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch(postgres.to_dollar(sql), *args)]
        finally:
            await conn.close()

    async def execute(sql: str, *args: Any) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(postgres.to_dollar(sql), *args)
        finally:
            await conn.close()

    async def migrate_to(version: int) -> None:
        conn = await asyncpg.connect(url)
        try:
            await postgres.apply_migrations(conn, load_migrations("postgres")[:version])
        finally:
            await conn.close()

    async def dump() -> bytes:
        tables = await fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        out = []
        for (table,) in tables:
            out += [str(r[0]) for r in await fetch(f'SELECT t::text FROM "{table}" t')]
        return "\n".join(out).encode()

    return Backend("postgres", lambda box: postgres.PostgresStore(url, box, lock_pool_size=4),
                   fetch, execute, migrate_to, dump, {"kind": "postgres", "url": url})


@asynccontextmanager
async def pg_schema() -> AsyncIterator[Backend]:
    """A fresh schema on the test server, dropped afterwards."""
    admin_url = await pg_admin_url()
    schema = f"gwtest_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield _pg_backend(str(URL(admin_url).update_query(search_path=schema)))
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield _sqlite_backend(tmp_path / "data" / "gateway.db")
        return
    async with pg_schema() as pg:
        yield pg


@pytest.fixture
async def pg_backend() -> AsyncIterator[Backend]:
    """PostgreSQL alone, for the tests of what only that backend has."""
    async with pg_schema() as pg:
        yield pg


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(secrets.token_bytes(32))


StoreFactory = Callable[[SecretBox], Awaitable[Store]]


@pytest.fixture
async def open_store(backend: Backend) -> AsyncIterator[StoreFactory]:
    """Open more stores on the test's database; each is closed at teardown if still open."""
    opened: list[Store] = []

    async def make(box: SecretBox) -> Store:
        s = backend.make(box)
        opened.append(s)
        await s.open()
        return s

    yield make
    for s in opened:
        await s.close()


@pytest.fixture
async def store(backend: Backend, box: SecretBox) -> AsyncIterator[Store]:
    s = backend.make(box)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def other_store(backend: Backend, box: SecretBox) -> AsyncIterator[Store]:
    """A second instance on the same database, as another worker or host would have."""
    s = backend.make(box)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# --------------------------------------------------------------------------- lock holder


@dataclass
class Holder:
    proc: asyncio.subprocess.Process

    async def line(self) -> str:
        assert self.proc.stdout is not None
        return (await self.proc.stdout.readline()).decode().strip()

    async def release(self) -> str:
        """Tell the holder to leave its lock; what it reports afterwards."""
        out, _ = await self.proc.communicate(b"release\n")
        return out.decode().strip()


@asynccontextmanager
async def lock_holder(backend: Backend, identity_id: int, provider: str) -> AsyncIterator[Holder]:
    """A separate process holding ``refresh_lock(identity_id, provider)`` until released."""
    spec = {**backend.holder_spec, "identity_id": identity_id, "provider": provider}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HOLDER), json.dumps(spec), env=env, cwd=str(REPO),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    holder = Holder(proc)
    try:
        first = await holder.line()
        assert first == "held", f"lock holder did not take the lock: {first!r}"
        yield holder
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()
