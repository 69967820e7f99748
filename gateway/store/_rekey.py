"""Key rotation for both SQL backends: re-encrypt stored secrets, count those not yet done.

Every encrypted column starts with a format byte and the 4-byte id of the key that sealed it
(see :mod:`gateway.tokens.crypto`), so ``substr(column, 2, 4)`` finds stale values in SQL, in
both dialects, without decrypting anything.

A rotation walks each table in primary-key order, ``batch`` stale rows at a time, each batch
in its own transaction, while gateways keep serving from the same store:

* each stale value is decrypted with whichever configured key sealed it and sealed again with
  the current key under the same context (row and field), so it stays bound to its row;
* the write is a compare-and-set: on ``version`` for connections (a refresh that lands
  between our read and our write bumps it, so its new tokens are never overwritten with
  re-encrypted old ones), on the old ciphertext elsewhere. The version is *not* bumped: the
  plaintext did not change, so caches elsewhere stay valid and a refresh in flight keeps its
  own compare-and-set;
* rows that lost such a race are picked up by another pass; rows no configured key can
  decrypt are counted and left untouched (keyset pagination steps over them, so they are
  never re-read in a loop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import BadRequest, DecryptionError
from gateway.store._codec import (
    Row,
    conn_context,
    pending_context,
    secret_context,
    session_context,
)
from gateway.store.base import ReencryptReport
from gateway.tokens.crypto import SecretBox

if TYPE_CHECKING:
    from gateway.store._sql import Executor

ExecutorFactory = Callable[[], AbstractAsyncContextManager["Executor"]]
MAX_PASSES = 5  # a row racing with refreshes this often is left for the next run


@dataclass(frozen=True, slots=True)
class SecretTable:
    """Where secrets live: a table, its primary key (also the scan order), its encrypted
    columns, the version column guarding writes (if any) and each value's context."""

    name: str
    keys: tuple[str, ...]
    columns: tuple[str, ...]
    version: str | None
    context: Callable[[Row, str], str]

    def stale_sql(self) -> str:
        """Rows with a value under another key; one ``?`` (the current key id) per column."""
        return "(" + " OR ".join(f"substr({c}, 2, 4) <> ?" for c in self.columns) + ")"

    def after_sql(self) -> str:
        """Rows after a given primary key in scan order (row values, spelled out)."""
        terms = []
        for i, k in enumerate(self.keys):
            terms.append("(" + " AND ".join([*(f"{p} = ?" for p in self.keys[:i]),
                                              f"{k} > ?"]) + ")")
        return "(" + " OR ".join(terms) + ")"

    def after_args(self, last: Sequence[Any]) -> list[Any]:
        args: list[Any] = []
        for i in range(len(self.keys)):
            args += [*last[:i], last[i]]
        return args

    def select_sql(self, after: bool) -> str:
        cols = ", ".join([*self.keys, *self.columns, *([self.version] if self.version else [])])
        where = self.stale_sql() + (f" AND {self.after_sql()}" if after else "")
        return (f"SELECT {cols} FROM {self.name} WHERE {where} "  # noqa: S608 - fixed names
                f"ORDER BY {', '.join(self.keys)} LIMIT ?")

    def update_sql(self, changed: Sequence[str]) -> str:
        sets = ", ".join(f"{c} = ?" for c in changed)
        where = [f"{k} = ?" for k in self.keys]
        where += [f"{self.version} = ?"] if self.version else [f"{c} = ?" for c in changed]
        return f"UPDATE {self.name} SET {sets} WHERE {' AND '.join(where)}"  # noqa: S608


TABLES: tuple[SecretTable, ...] = (
    SecretTable("connections", ("identity_id", "provider"), ("access_token", "refresh_token"),
                "version", lambda r, c: conn_context(int(r["identity_id"]), str(r["provider"]), c)),
    SecretTable("pending_authorizations", ("state_hash",), ("code_verifier",), None,
                lambda r, c: pending_context(bytes(r["state_hash"]))),
    SecretTable("sessions", ("id_hash",), ("csrf_token",), None,
                lambda r, c: session_context(bytes(r["id_hash"]))),
    SecretTable("server_secrets", ("name",), ("value",), None,
                lambda r, c: secret_context(str(r["name"]))),
)


@dataclass(frozen=True, slots=True)
class Rewrite:
    """One row's compare-and-set: the new ciphertexts of its stale columns."""

    sql: str
    args: tuple[Any, ...]


def plan(box: SecretBox, table: SecretTable, row: Row) -> Rewrite | None:
    """The rewrite that moves ``row`` to the current key (None if nothing is stale).
    Raises DecryptionError when a value cannot be decrypted with any configured key."""
    changed: list[str] = []
    new: list[bytes] = []
    old: list[bytes] = []
    for column in table.columns:
        blob = row[column]
        if blob is None or box.is_current(bytes(blob)):
            continue
        context = table.context(row, column)
        changed.append(column)
        new.append(box.encrypt(box.decrypt(bytes(blob), context), context))
        old.append(bytes(blob))
    if not changed:
        return None
    keys = [row[k] for k in table.keys]
    guard = [row[table.version]] if table.version else old
    return Rewrite(table.update_sql(changed), (*new, *keys, *guard))


async def count_stale(read: ExecutorFactory, box: SecretBox) -> int:
    total = 0
    async with read() as db:
        for t in TABLES:
            rows = await db.fetch(f"SELECT COUNT(*) AS n FROM {t.name} "  # noqa: S608
                                  f"WHERE {t.stale_sql()}", *([box.key_id] * len(t.columns)))
            total += int(rows[0]["n"])
    return total


async def reencrypt(read: ExecutorFactory, write: ExecutorFactory, box: SecretBox,
                    batch: int) -> ReencryptReport:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise BadRequest("batch must be a whole number of at least 1")
    done = unreadable = 0
    for table in TABLES:
        for _ in range(MAX_PASSES):
            rewritten, bad, raced = await _pass(read, write, box, table, batch)
            done += rewritten
            if not raced:
                break
        unreadable += bad  # as found by the last pass
    return ReencryptReport(reencrypted=done, unreadable=unreadable)


async def _pass(read: ExecutorFactory, write: ExecutorFactory, box: SecretBox,
                table: SecretTable, batch: int) -> tuple[int, int, int]:
    """One walk over ``table``: (rows rewritten, rows unreadable, rows that changed under us)."""
    rewritten = unreadable = raced = 0
    last: list[Any] | None = None
    key_ids = [box.key_id] * len(table.columns)
    while True:
        async with read() as db:
            if last is None:
                rows = await db.fetch(table.select_sql(False), *key_ids, batch)
            else:
                rows = await db.fetch(table.select_sql(True), *key_ids,
                                      *table.after_args(last), batch)
        if not rows:
            return rewritten, unreadable, raced
        last = [rows[-1][k] for k in table.keys]
        rewrites: list[Rewrite] = []
        for row in rows:
            try:
                rewrite = plan(box, table, row)
            except DecryptionError:
                unreadable += 1
                continue
            if rewrite is not None:
                rewrites.append(rewrite)
        if rewrites:
            async with write() as db:
                for rewrite in rewrites:
                    if await db.execute(rewrite.sql, *rewrite.args) == 1:
                        rewritten += 1
                    else:
                        raced += 1
        if len(rows) < batch:
            return rewritten, unreadable, raced
