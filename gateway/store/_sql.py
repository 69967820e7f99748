"""The Store's queries, written once for both SQL backends.

SQLite (3.35+) and PostgreSQL agree on everything used here: ``RETURNING``, ``ON CONFLICT``
upserts, ``DELETE ... RETURNING``. A backend supplies an :class:`Executor` for reads and one
for a write transaction (``?`` placeholders; PostgreSQL rewrites them), translates its
constraint errors into :class:`ConstraintViolation` and its outages into ``StoreUnavailable``.

Single use and compare-and-set are each one statement, so they hold under concurrency in both
backends: ``take_pending`` is ``DELETE ... RETURNING`` (the second taker finds no row),
``use_link`` is ``INSERT ... ON CONFLICT DO NOTHING`` (the second inserter changes nothing),
and ``update_tokens`` is ``UPDATE ... WHERE version = ?``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

from gateway.errors import BadRequest
from gateway.store import _codec as codec
from gateway.store import _rekey
from gateway.store._codec import Row
from gateway.store.base import (
    ApiKey,
    AuditEvent,
    Connection,
    ConnectionStatus,
    Identity,
    PendingAuthorization,
    ReencryptReport,
    TokenFields,
    WebSession,
)
from gateway.tokens.crypto import SecretBox

ViolationKind = Literal["unique", "foreign_key", "check"]


class ConstraintViolation(Exception):
    """A backend's integrity error, reduced to what the Store's callers need to know."""

    def __init__(self, kind: ViolationKind) -> None:
        super().__init__(kind)
        self.kind = kind


class Executor(Protocol):
    async def fetch(self, sql: str, *args: Any) -> Sequence[Row]: ...
    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""
    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None: ...


class SqlStore(abc.ABC):
    """Everything in :class:`~gateway.store.base.Store` except connecting and locking."""

    def __init__(self, box: SecretBox) -> None:
        self._box = box

    @abc.abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Executor]:
        """An executor for single-statement reads (each sees committed data)."""

    @abc.abstractmethod
    def _write(self) -> AbstractAsyncContextManager[Executor]:
        """An executor inside one write transaction, committed when the block exits cleanly."""

    async def _one(self, sql: str, *args: Any) -> Row | None:
        async with self._read() as db:
            rows = await db.fetch(sql, *args)
        return rows[0] if rows else None

    # identities -------------------------------------------------------------

    async def create_identity(self, name: str, password_hash: str | None, now: float) -> Identity:
        if not isinstance(name, str) or not name:
            raise BadRequest("an identity needs a non-empty name")
        try:
            async with self._write() as db:
                rows = await db.fetch(
                    "INSERT INTO identities (name, password_hash, created_at) VALUES (?, ?, ?) "
                    "RETURNING *", name, password_hash, float(now))
        except ConstraintViolation:
            raise BadRequest(f"identity {name!r} already exists") from None
        return codec.identity_from_row(rows[0])

    async def get_identity(self, name: str) -> Identity | None:
        row = await self._one("SELECT * FROM identities WHERE name = ?", name)
        return None if row is None else codec.identity_from_row(row)

    async def get_identity_by_id(self, identity_id: int) -> Identity | None:
        row = await self._one("SELECT * FROM identities WHERE id = ?", identity_id)
        return None if row is None else codec.identity_from_row(row)

    async def list_identities(self) -> Sequence[Identity]:
        async with self._read() as db:
            rows = await db.fetch("SELECT * FROM identities ORDER BY name")
        return [codec.identity_from_row(r) for r in rows]

    async def delete_identity(self, name: str) -> bool:
        # ON DELETE CASCADE takes keys, connections, sessions and pending grants along.
        async with self._write() as db:
            return await db.execute("DELETE FROM identities WHERE name = ?", name) > 0

    async def set_password(self, name: str, password_hash: str | None) -> bool:
        async with self._write() as db:
            return await db.execute("UPDATE identities SET password_hash = ? WHERE name = ?",
                                    password_hash, name) > 0

    # API keys ---------------------------------------------------------------

    async def add_api_key(self, identity_id: int, key_hash: bytes, prefix: str,
                          now: float) -> ApiKey:
        try:
            async with self._write() as db:
                rows = await db.fetch(
                    "INSERT INTO api_keys (identity_id, key_hash, prefix, created_at) "
                    "VALUES (?, ?, ?, ?) RETURNING *",
                    identity_id, bytes(key_hash), prefix, float(now))
        except ConstraintViolation as e:
            raise BadRequest("no such identity" if e.kind == "foreign_key"
                             else "this API key is already registered") from None
        return codec.api_key_from_row(rows[0])

    async def find_api_key(self, key_hash: bytes) -> tuple[ApiKey, Identity] | None:
        row = await self._one(
            "SELECT k.*, i.name, i.password_hash, i.created_at AS identity_created_at "
            "FROM api_keys k JOIN identities i ON i.id = k.identity_id "
            "WHERE k.key_hash = ? AND k.revoked_at IS NULL", bytes(key_hash))
        if row is None:
            return None
        identity = Identity(id=int(row["identity_id"]), name=row["name"],
                            password_hash=row["password_hash"],
                            created_at=float(row["identity_created_at"]))
        return codec.api_key_from_row(row), identity

    async def list_api_keys(self, identity_id: int) -> Sequence[ApiKey]:
        async with self._read() as db:
            rows = await db.fetch("SELECT * FROM api_keys WHERE identity_id = ? ORDER BY id",
                                  identity_id)
        return [codec.api_key_from_row(r) for r in rows]

    async def revoke_api_key(self, identity_id: int, prefix: str, now: float) -> bool:
        async with self._write() as db:
            return await db.execute(
                "UPDATE api_keys SET revoked_at = ? "
                "WHERE identity_id = ? AND prefix = ? AND revoked_at IS NULL",
                float(now), identity_id, prefix) > 0

    async def touch_api_keys(self, last_used: Mapping[int, float]) -> None:
        if not last_used:
            return
        # Only ever moves last_used_at forward; rows in id order, so concurrent batches from
        # several instances lock them in the same order and cannot deadlock.
        async with self._write() as db:
            await db.executemany(
                "UPDATE api_keys SET last_used_at = ? "
                "WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
                [(float(t), key_id, float(t)) for key_id, t in sorted(last_used.items())])

    # connections ------------------------------------------------------------

    async def get_connection(self, identity_id: int, provider: str) -> Connection | None:
        row = await self._one("SELECT * FROM connections WHERE identity_id = ? AND provider = ?",
                              identity_id, provider)
        return None if row is None else codec.connection_from_row(self._box, row)

    async def list_connections(self, identity_id: int | None = None) -> Sequence[Connection]:
        async with self._read() as db:
            if identity_id is None:
                rows = await db.fetch("SELECT * FROM connections ORDER BY identity_id, provider")
            else:
                rows = await db.fetch(
                    "SELECT * FROM connections WHERE identity_id = ? ORDER BY provider",
                    identity_id)
        return [codec.connection_from_row(self._box, r) for r in rows]

    async def put_connection(self, identity_id: int, provider: str, tokens: TokenFields,
                             account_id: str | None, now: float) -> Connection:
        sealed = codec.seal_tokens(self._box, identity_id, provider, tokens)
        try:
            async with self._write() as db:
                rows = await db.fetch(
                    "INSERT INTO connections (identity_id, provider, access_token, refresh_token, "
                    "token_type, expires_at, scopes, extra, account_id, status, version, "
                    "created_at, updated_at, refreshed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', 1, ?, ?, NULL) "
                    "ON CONFLICT (identity_id, provider) DO UPDATE SET "
                    "access_token = excluded.access_token, "
                    "refresh_token = excluded.refresh_token, "
                    "token_type = excluded.token_type, expires_at = excluded.expires_at, "
                    "scopes = excluded.scopes, extra = excluded.extra, "
                    "account_id = excluded.account_id, status = 'active', "
                    "version = connections.version + 1, updated_at = excluded.updated_at, "
                    "refreshed_at = NULL "
                    "RETURNING *",
                    identity_id, provider, sealed.access_token, sealed.refresh_token,
                    sealed.token_type, sealed.expires_at, sealed.scopes, sealed.extra,
                    account_id, float(now), float(now))
        except ConstraintViolation:
            raise BadRequest("no such identity") from None
        return codec.connection_from_row(self._box, rows[0])

    async def update_tokens(self, identity_id: int, provider: str, expected_version: int,
                            tokens: TokenFields, now: float) -> Connection | None:
        """Compare-and-set on ``version``. A response without a refresh token keeps the stored
        one (RFC 6749 §6: the server *may* issue a new refresh token)."""
        sealed = codec.seal_tokens(self._box, identity_id, provider, tokens)
        async with self._write() as db:
            rows = await db.fetch(
                "UPDATE connections SET access_token = ?, "
                "refresh_token = COALESCE(?, refresh_token), token_type = ?, expires_at = ?, "
                "scopes = ?, extra = ?, version = version + 1, updated_at = ?, "
                "refreshed_at = ? "
                "WHERE identity_id = ? AND provider = ? AND version = ? RETURNING *",
                sealed.access_token, sealed.refresh_token, sealed.token_type, sealed.expires_at,
                sealed.scopes, sealed.extra, float(now), float(now),
                identity_id, provider, expected_version)
        return codec.connection_from_row(self._box, rows[0]) if rows else None

    async def set_status(self, identity_id: int, provider: str,
                         status: ConnectionStatus, now: float) -> Connection | None:
        """Bumps ``version`` too, so a refresh racing with this change loses its CAS."""
        if status not in codec.STATUSES:
            raise BadRequest(f"unknown connection status {status!r}")
        async with self._write() as db:
            rows = await db.fetch(
                "UPDATE connections SET status = ?, version = version + 1, updated_at = ? "
                "WHERE identity_id = ? AND provider = ? RETURNING *",
                status, float(now), identity_id, provider)
        return codec.connection_from_row(self._box, rows[0]) if rows else None

    async def delete_connection(self, identity_id: int, provider: str) -> bool:
        async with self._write() as db:
            return await db.execute(
                "DELETE FROM connections WHERE identity_id = ? AND provider = ?",
                identity_id, provider) > 0

    # pending authorizations (OAuth state) -----------------------------------

    async def add_pending(self, pending: PendingAuthorization) -> None:
        verifier = codec.seal_pending(self._box, pending)
        try:
            async with self._write() as db:
                await db.execute(
                    "INSERT INTO pending_authorizations (state_hash, identity_id, provider, "
                    "code_verifier, nonce, return_to, created_at, expires_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    bytes(pending.state_hash), pending.identity_id, pending.provider, verifier,
                    pending.nonce, pending.return_to, float(pending.created_at),
                    float(pending.expires_at))
        except ConstraintViolation as e:
            raise BadRequest("no such identity" if e.kind == "foreign_key"
                             else "this authorization state is already pending") from None

    async def take_pending(self, state_hash: bytes, now: float) -> PendingAuthorization | None:
        # The row goes whether or not it expired: a state is consumed by its first use.
        async with self._write() as db:
            rows = await db.fetch(
                "DELETE FROM pending_authorizations WHERE state_hash = ? RETURNING *",
                bytes(state_hash))
        if not rows or rows[0]["expires_at"] <= now:
            return None
        return codec.pending_from_row(self._box, rows[0])

    async def count_pending(self, identity_id: int, now: float) -> int:
        row = await self._one(
            "SELECT COUNT(*) AS n FROM pending_authorizations "
            "WHERE identity_id = ? AND expires_at > ?", identity_id, float(now))
        return int(row["n"]) if row is not None else 0

    async def use_link(self, link_id: bytes, expires_at: float, now: float) -> bool:
        """False if the link was used already, or has expired (defence in depth)."""
        if expires_at <= now:
            return False
        async with self._write() as db:
            return await db.execute(
                "INSERT INTO used_links (link_id, expires_at) VALUES (?, ?) "
                "ON CONFLICT (link_id) DO NOTHING", bytes(link_id), float(expires_at)) == 1

    # web sessions -----------------------------------------------------------

    async def add_session(self, session: WebSession) -> None:
        csrf = codec.seal_session(self._box, session)
        try:
            async with self._write() as db:
                await db.execute(
                    "INSERT INTO sessions (id_hash, identity_id, csrf_token, created_at, "
                    "last_seen_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                    bytes(session.id_hash), session.identity_id, csrf,
                    float(session.created_at), float(session.last_seen_at),
                    float(session.expires_at))
        except ConstraintViolation as e:
            raise BadRequest("no such identity" if e.kind == "foreign_key"
                             else "this session id is already in use") from None

    async def get_session(self, id_hash: bytes, now: float) -> WebSession | None:
        row = await self._one("SELECT * FROM sessions WHERE id_hash = ? AND expires_at > ?",
                              bytes(id_hash), float(now))
        return None if row is None else codec.session_from_row(self._box, row)

    async def touch_session(self, id_hash: bytes, now: float) -> None:
        async with self._write() as db:
            await db.execute("UPDATE sessions SET last_seen_at = ? "
                             "WHERE id_hash = ? AND last_seen_at < ?",
                             float(now), bytes(id_hash), float(now))

    async def delete_session(self, id_hash: bytes) -> None:
        async with self._write() as db:
            await db.execute("DELETE FROM sessions WHERE id_hash = ?", bytes(id_hash))

    # audit & housekeeping ---------------------------------------------------

    async def add_audit(self, event: AuditEvent) -> None:
        async with self._write() as db:
            await db.execute(
                "INSERT INTO audit_events (at, kind, outcome, identity, provider, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)", float(event.at), event.kind, event.outcome,
                event.identity, event.provider, event.detail)

    async def list_audit(self, identity: str | None = None, since: float | None = None,
                         limit: int = 1000) -> Sequence[AuditEvent]:
        """Newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise BadRequest("limit must be a non-negative integer")
        where: list[str] = []
        args: list[Any] = []
        if identity is not None:
            where.append("identity = ?")
            args.append(identity)
        if since is not None:
            where.append("at >= ?")
            args.append(float(since))
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        async with self._read() as db:
            rows = await db.fetch(
                f"SELECT * FROM audit_events {clause}ORDER BY at DESC, id DESC LIMIT ?",  # noqa: S608 - fixed fragments
                *args, limit)
        return [codec.audit_from_row(r) for r in rows]

    async def purge_expired(self, now: float, audit_before: float | None = None) -> None:
        async with self._write() as db:
            await db.execute("DELETE FROM pending_authorizations WHERE expires_at <= ?",
                             float(now))
            await db.execute("DELETE FROM used_links WHERE expires_at <= ?", float(now))
            await db.execute("DELETE FROM sessions WHERE expires_at <= ?", float(now))
            if audit_before is not None:
                await db.execute("DELETE FROM audit_events WHERE at < ?", float(audit_before))

    # encryption keys ---------------------------------------------------------

    async def reencrypt(self, batch: int = 500) -> ReencryptReport:
        """See :mod:`gateway.store._rekey`."""
        return await _rekey.reencrypt(self._read, self._write, self._box, batch)

    async def count_stale_secrets(self) -> int:
        return await _rekey.count_stale(self._read, self._box)

    async def server_secret(self, name: str, initial: bytes) -> bytes:
        """Insert-if-absent, then read: processes starting together agree on one value."""
        if not isinstance(name, str) or not name:
            raise BadRequest("a server secret needs a non-empty name")
        if not isinstance(initial, bytes) or len(initial) < 16:
            raise BadRequest("a server secret must be at least 16 bytes")
        context = codec.secret_context(name)
        async with self._write() as db:
            # A concurrent inserter makes ours wait, then do nothing; the SELECT (a new
            # snapshot in READ COMMITTED) sees the winner's row.
            await db.execute("INSERT INTO server_secrets (name, value) VALUES (?, ?) "
                             "ON CONFLICT (name) DO NOTHING",
                             name, self._box.encrypt(initial.hex(), context))
            rows = await db.fetch("SELECT value FROM server_secrets WHERE name = ?", name)
        return bytes.fromhex(self._box.decrypt(rows[0]["value"], context))
