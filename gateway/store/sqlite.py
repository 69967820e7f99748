"""SQLite backend: one database file shared by the worker processes of one host.

Theory of operation:

* Each store holds two connections in WAL mode: a *writer*, used under an asyncio lock for one
  ``BEGIN IMMEDIATE`` transaction at a time, and a *reader* for single-statement reads (WAL
  lets them run while another connection writes). Other processes wait on SQLite's file
  locks for up to ``busy_timeout``; beyond that, and on disk-full, read-only or I/O errors,
  callers get ``StoreUnavailable``.
* A transaction interrupted by cancellation still ends cleanly: aiosqlite runs statements in
  order on one thread, so the ROLLBACK queued by the cancelled coroutine runs right after
  the statement it abandoned, before the next writer's BEGIN.
* Migrations are ``migrations/sqlite/NNNN_*.sql``, each applied in its own ``BEGIN
  IMMEDIATE`` transaction together with its ``schema_version`` row; the version is re-read
  inside the transaction, so processes starting together apply each migration once.
* ``refresh_lock`` is an asyncio lock per key, then ``flock`` on a per-key file in
  ``<db>.locks/``; the kernel releases the file lock when its holder dies.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.errors import StoreUnavailable
from gateway.store._codec import Migration, Row, load_migrations, too_new
from gateway.store._locks import KeyedLocks, deadline_after, file_lock, lock_digest
from gateway.store._sql import ConstraintViolation, Executor, SqlStore, ViolationKind
from gateway.tokens.crypto import SecretBox

__all__ = ["SqliteStore", "apply_migrations", "split_script"]

# Primary result codes that mean "the database cannot serve us right now", not "bad query":
# BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
_UNAVAILABLE = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})
# Extended constraint codes: UNIQUE, PRIMARYKEY, FOREIGNKEY, CHECK.
_CONSTRAINTS: dict[int, ViolationKind] = {2067: "unique", 1555: "unique", 787: "foreign_key",
                                          275: "check"}


def split_script(script: str) -> list[str]:
    """Split a migration file into statements (``executescript`` would commit on its own)."""
    statements, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip())
            buf = ""
    rest = [ln for ln in buf.splitlines() if ln.strip() and not ln.lstrip().startswith("--")]
    if rest:
        raise ValueError("migration ends with an incomplete statement")
    return statements


async def _version(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
    return int(rows[0][0])


async def apply_migrations(db: aiosqlite.Connection, migrations: Sequence[Migration]) -> int:
    """Bring ``db`` (autocommit mode) up to the last of ``migrations``; the version reached."""
    await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                     "name TEXT NOT NULL, applied_at REAL NOT NULL)")
    current = await _version(db)
    if current > len(migrations):
        raise StoreUnavailable(too_new(current, len(migrations)))
    for mig in migrations[current:]:
        try:
            await db.execute("BEGIN IMMEDIATE")
            if await _version(db) < mig.version:  # another process may have just applied it
                for statement in split_script(mig.sql):
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version, name, applied_at) "
                                 "VALUES (?, ?, ?)", (mig.version, mig.name, time.time()))
            await db.commit()
        except BaseException:
            with suppress(sqlite3.Error):
                await db.rollback()
            raise
    return await _version(db)


class _Executor:
    __slots__ = ("_db",)

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def fetch(self, sql: str, *args: Any) -> Sequence[Row]:
        return list(await self._db.execute_fetchall(sql, args))

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self._db.execute(sql, args)
        changed = cursor.rowcount
        await cursor.close()
        return changed

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        cursor = await self._db.executemany(sql, list(args))
        await cursor.close()


class SqliteStore(SqlStore):
    """The :class:`~gateway.store.base.Store` on a SQLite file (see the module docstring)."""

    def __init__(self, path: Path, box: SecretBox, *, busy_timeout: float = 5.0) -> None:
        super().__init__(box)
        self.path = Path(path)
        self.locks_dir = self.path.with_name(self.path.name + ".locks")
        self._busy_ms = max(0, int(busy_timeout * 1000))
        self._wr: aiosqlite.Connection | None = None
        self._rd: aiosqlite.Connection | None = None
        self._wlock = asyncio.Lock()
        self._local = KeyedLocks()

    # lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        if self._wr is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.locks_dir.mkdir(mode=0o700, exist_ok=True)
            # Create the file ourselves: SQLite would honour the umask; WAL files copy this mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise StoreUnavailable(f"cannot create the SQLite database {self.path}: "
                                   f"{e.strerror}") from None
        # Switching a new file to WAL fails at once (SQLite skips the busy handler there) if
        # another process does the same, so workers starting together take turns here.
        async with file_lock(self.locks_dir / "open.lock",
                             deadline_after(self._busy_ms / 1000)) as turn:
            if not turn:
                raise StoreUnavailable(f"timed out waiting to open the SQLite database "
                                       f"{self.path} while another process opens it")
            with self._mapped():
                wr = await self._connect()
                try:
                    await apply_migrations(wr, load_migrations("sqlite"))
                    rd = await self._connect()
                except BaseException:
                    await wr.close()
                    raise
        self._wr, self._rd = wr, rd

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None,
                                     timeout=self._busy_ms / 1000)
        try:
            db.row_factory = sqlite3.Row
            await db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            await db.execute("PRAGMA foreign_keys = ON")
            # FULL: a rotated refresh token must survive a power cut once we have used it.
            await db.execute("PRAGMA synchronous = FULL")
            if await self._journal_mode(db) != "wal":  # persistent: only a new file switches
                await db.execute("PRAGMA journal_mode = WAL")
                if await self._journal_mode(db) != "wal":
                    raise StoreUnavailable(f"the SQLite database {self.path} cannot use WAL")
        except BaseException:
            await db.close()
            raise
        return db

    @staticmethod
    async def _journal_mode(db: aiosqlite.Connection) -> str:
        rows = list(await db.execute_fetchall("PRAGMA journal_mode"))
        return str(rows[0][0]).lower()

    async def close(self) -> None:
        wr, rd = self._wr, self._rd
        self._wr = self._rd = None
        if rd is not None:
            await rd.close()
        if wr is not None:
            async with self._wlock:  # let a running transaction finish first
                await wr.close()

    async def ping(self) -> None:
        async with self._read() as db:
            await db.fetch("SELECT MAX(version) FROM schema_version")

    # plumbing ---------------------------------------------------------------

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """Translate sqlite3 errors at the boundary; never echo SQL parameters."""
        try:
            yield
        except sqlite3.IntegrityError as e:
            kind = _CONSTRAINTS.get(getattr(e, "sqlite_errorcode", 0))
            if kind is None:
                raise
            raise ConstraintViolation(kind) from None
        except sqlite3.Error as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF in _UNAVAILABLE:
                raise StoreUnavailable(
                    f"the SQLite database {self.path} is unavailable: {e}") from e
            raise

    def _conn(self, db: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if db is None:
            raise StoreUnavailable("the store is not open")
        return db

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Executor]:
        db = self._conn(self._rd)
        with self._mapped():
            yield _Executor(db)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Executor]:
        db = self._conn(self._wr)
        async with self._wlock:
            with self._mapped():
                try:
                    # BEGIN inside the try: if we are cancelled while it waits on a busy
                    # database, the ROLLBACK below is still queued behind it.
                    await db.execute("BEGIN IMMEDIATE")
                    yield _Executor(db)
                    await db.commit()
                except BaseException:
                    with suppress(sqlite3.Error):
                        await db.rollback()
                    raise

    # refresh lock -----------------------------------------------------------

    @asynccontextmanager
    async def refresh_lock(self, identity_id: int, provider: str,
                           timeout: float) -> AsyncIterator[bool]:  # noqa: ASYNC109
        """Exclusive across coroutines and processes of this host (see module docstring)."""
        self._conn(self._wr)
        deadline = deadline_after(timeout)
        name = lock_digest(identity_id, provider).hex()[:32]
        async with self._local.hold(name, deadline) as held:
            if not held:
                yield False
                return
            async with file_lock(self.locks_dir / f"{name}.lock", deadline) as held_file:
                yield held_file
