"""PostgreSQL backend: for several gateway instances (on several hosts) sharing one database.

Theory of operation:

* Queries come from :class:`~gateway.store._sql.SqlStore`; each write is one transaction on a
  pooled connection (READ COMMITTED suffices: every single-use or compare-and-set operation is
  one statement, and PostgreSQL re-checks its WHERE clause after waiting on a row lock).
* Migrations (``migrations/postgres/NNNN_*.sql``) run under a session advisory lock, so
  instances starting together apply each one exactly once; each migration commits together
  with its ``schema_version`` row. Tables live in the first schema of ``search_path`` (pass
  ``?search_path=name`` in the URL); advisory lock keys include that schema, because advisory
  locks are per database and gateways in separate schemas must not contend.
* ``refresh_lock`` takes a per-key asyncio lock, then a session-level ``pg_advisory_lock`` on a
  connection from a separate small pool (waiting holders never starve queries), bounded by
  ``lock_timeout``. The server drops the lock when the holder's session ends, including when
  the holder process dies; on any doubt (cancellation mid-wait, a failed unlock) we terminate
  the connection rather than risk returning a locked session to the pool.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import math
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import asyncpg
from asyncpg import exceptions as pgerr

from gateway.errors import StoreUnavailable
from gateway.store._codec import Migration, Row, load_migrations, too_new
from gateway.store._locks import KeyedLocks, deadline_after, lock_key64, remaining
from gateway.store._sql import ConstraintViolation, Executor, SqlStore, ViolationKind
from gateway.tokens.crypto import SecretBox

__all__ = ["PostgresStore", "apply_migrations"]

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    pgerr.PostgresConnectionError,  # 08: connection lost or refused
    pgerr.InsufficientResourcesError,  # 53: disk full, too many connections
    pgerr.OperatorInterventionError,  # 57: shutdown, cancelled, cannot connect now
    pgerr.ReadOnlySQLTransactionError,  # a read-only replica or default_transaction_read_only
    pgerr.InterfaceError,  # client side: connection or pool closed
    OSError,  # includes TimeoutError
)
_CONSTRAINTS: dict[type[BaseException], ViolationKind] = {
    pgerr.UniqueViolationError: "unique",
    pgerr.ForeignKeyViolationError: "foreign_key",
    pgerr.CheckViolationError: "check",
}


def _key64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


@functools.lru_cache(maxsize=512)
def to_dollar(sql: str) -> str:
    """``?`` placeholders (shared SQL) to PostgreSQL's ``$1, $2, ...``."""
    counter = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


async def apply_migrations(conn: asyncpg.Connection, migrations: Sequence[Migration]) -> int:
    """Bring the connection's schema up to the last of ``migrations``; the version reached."""
    schema = await conn.fetchval("SELECT current_schema()")
    if schema is None:
        raise StoreUnavailable("PostgreSQL search_path names no existing schema")
    key = _key64(f"gateway/migrate/{schema}")
    await conn.execute("SELECT pg_advisory_lock($1)", key)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY "
                           "KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
        current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
        if current > len(migrations):
            raise StoreUnavailable(too_new(current, len(migrations)))
        for mig in migrations[current:]:
            async with conn.transaction():
                await conn.execute(mig.sql)  # no arguments: simple protocol, many statements
                await conn.execute("INSERT INTO schema_version (version, name, applied_at) "
                                   "VALUES ($1, $2, $3)", mig.version, mig.name, time.time())
        return int(await conn.fetchval("SELECT MAX(version) FROM schema_version"))
    finally:
        with suppress(Exception):  # the pool's reset unlocks too, or the session is gone
            await conn.execute("SELECT pg_advisory_unlock($1)", key)


class _Executor:
    __slots__ = ("_c",)

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._c = conn

    async def fetch(self, sql: str, *args: Any) -> Sequence[Row]:
        return await self._c.fetch(to_dollar(sql), *args)  # type: ignore[no-any-return]

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self._c.execute(to_dollar(sql), *args)  # "UPDATE 3", "INSERT 0 1"
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        await self._c.executemany(to_dollar(sql), list(args))


class PostgresStore(SqlStore):
    """The :class:`~gateway.store.base.Store` on PostgreSQL (see the module docstring)."""

    def __init__(self, url: str, box: SecretBox, *, min_size: int = 1, max_size: int = 10,
                 lock_pool_size: int = 10, timeout: float = 10.0) -> None:
        super().__init__(box)
        self._url = url
        self._sizes = (min_size, max_size, lock_pool_size)
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._lock_pool: asyncpg.Pool | None = None
        self._local = KeyedLocks()
        self._namespace = ""  # the schema, set by open(); scopes the advisory lock keys

    # lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        min_size, max_size, lock_size = self._sizes
        try:
            pool = await asyncpg.create_pool(self._url, min_size=min_size, max_size=max_size,
                                             timeout=self._timeout,
                                             command_timeout=self._timeout)
        except (pgerr.PostgresError, pgerr.InterfaceError, OSError) as e:
            # Messages name host, user or database at most, never the password.
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {type(e).__name__}: {e}") from e
        try:
            with self._mapped():
                async with pool.acquire() as conn:
                    await apply_migrations(conn, load_migrations("postgres"))
                    self._namespace = str(await conn.fetchval("SELECT current_schema()"))
                # No command_timeout here: waiting for a lock is bounded by lock_timeout.
                lock_pool = await asyncpg.create_pool(self._url, min_size=0, max_size=lock_size,
                                                      timeout=self._timeout)
        except BaseException:
            pool.terminate()
            raise
        self._pool, self._lock_pool = pool, lock_pool

    async def close(self) -> None:
        pools = [p for p in (self._lock_pool, self._pool) if p is not None]
        self._pool = self._lock_pool = None
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except TimeoutError:
                pool.terminate()

    async def ping(self) -> None:
        async with self._read() as db:
            await db.fetch("SELECT 1")

    # plumbing ---------------------------------------------------------------

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """Translate asyncpg errors at the boundary; never echo SQL parameters."""
        try:
            yield
        except pgerr.IntegrityConstraintViolationError as e:
            kind = _CONSTRAINTS.get(type(e))
            if kind is None:
                raise
            raise ConstraintViolation(kind) from None
        except pgerr.DataError:  # a caller passed a wrongly typed argument: a bug, not an outage
            raise
        except _UNAVAILABLE as e:
            raise StoreUnavailable(
                f"the PostgreSQL store is unavailable ({type(e).__name__})") from e

    def _open_pool(self, pool: asyncpg.Pool | None) -> asyncpg.Pool:
        if pool is None:
            raise StoreUnavailable("the store is not open")
        return pool

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Executor]:
        pool = self._open_pool(self._pool)
        with self._mapped():
            async with pool.acquire(timeout=self._timeout) as conn:
                yield _Executor(conn)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Executor]:
        pool = self._open_pool(self._pool)
        with self._mapped():
            async with pool.acquire(timeout=self._timeout) as conn, conn.transaction():
                yield _Executor(conn)

    # refresh lock -----------------------------------------------------------

    @asynccontextmanager
    async def refresh_lock(self, identity_id: int, provider: str,
                           timeout: float) -> AsyncIterator[bool]:  # noqa: ASYNC109
        """Exclusive across every instance sharing the database (see module docstring)."""
        pool = self._open_pool(self._lock_pool)
        deadline = deadline_after(timeout)
        key = lock_key64(identity_id, provider, self._namespace)
        async with self._local.hold(str(key), deadline) as held:
            if not held:
                yield False
                return
            with self._mapped():
                conn = await pool.acquire(timeout=self._timeout)
            try:
                with self._mapped():
                    acquired = await self._advisory_lock(conn, key, deadline)
            except BaseException:
                _terminate(conn)  # state unknown (e.g. cancelled mid-wait): drop the session
                await pool.release(conn)
                raise
            try:
                yield acquired
            finally:
                await self._unlock(pool, conn, key, acquired)

    async def _advisory_lock(self, conn: asyncpg.Connection, key: int, deadline: float) -> bool:
        left = remaining(deadline)
        if left <= 0:
            return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
        # lock_timeout 0 means "wait forever"; asyncpg's own timeout is only a backstop.
        ms = max(1, math.ceil(left * 1000)) if math.isfinite(left) else 0
        await conn.execute(f"SET lock_timeout = {ms}")
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", key,
                               timeout=left + self._timeout if ms else None)
        except pgerr.LockNotAvailableError:
            acquired = False
        else:
            acquired = True
        # Not in a finally: after a cancellation the caller terminates the session instead.
        await conn.execute("RESET lock_timeout")
        return acquired

    async def _unlock(self, pool: asyncpg.Pool, conn: asyncpg.Connection, key: int,
                      held: bool) -> None:
        try:
            if held:
                await conn.execute("SELECT pg_advisory_unlock($1)", key, timeout=self._timeout)
        except Exception:
            _terminate(conn)  # the lock ends with the session; the refresh itself succeeded
        except BaseException:
            _terminate(conn)
            raise
        finally:
            await pool.release(conn)


def _terminate(conn: asyncpg.Connection) -> None:
    """Drop the session (and every lock it holds) unless the pool already took it back."""
    with suppress(pgerr.InterfaceError):
        conn.terminate()
