"""The store interface: records and the :class:`Store` protocol every backend implements.

Backends (SQLite, PostgreSQL) own persistence *and* encryption at rest: callers hand them
plaintext tokens and get plaintext back; the backend encrypts with its
:class:`~gateway.tokens.crypto.SecretBox`, binding ``identity_id/provider/field`` as associated
data. Secrets that only need comparing (API keys, OAuth ``state``, session ids) arrive already
hashed and are stored as given.

Times are POSIX seconds (float). Every write is one transaction. Connections carry a
``version`` counter, bumped on every token change, for compare-and-set updates and for other
instances to notice that their cached copy is stale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

ConnectionStatus = Literal["active", "reconsent_required"]


@dataclass(frozen=True, slots=True)
class Identity:
    id: int
    name: str
    password_hash: str | None = field(default=None, repr=False)
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    identity_id: int
    prefix: str  # short, non-secret, for display ("gwk_AbCd…")
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class TokenFields:
    """What a token endpoint gave us, as stored for a connection."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    token_type: str = "Bearer"  # noqa: S105 (a scheme name, not a secret)
    expires_at: float | None = None
    scopes: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)  # e.g. instance_url


@dataclass(frozen=True, slots=True)
class Connection:
    identity_id: int
    provider: str
    tokens: TokenFields
    account_id: str | None = None
    status: ConnectionStatus = "active"
    version: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0
    refreshed_at: float | None = None


@dataclass(frozen=True, slots=True)
class PendingAuthorization:
    state_hash: bytes  # sha256 of the state; the state itself is never stored
    identity_id: int
    provider: str
    code_verifier: str | None = field(repr=False)  # encrypted at rest
    nonce: str | None
    return_to: str | None
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class WebSession:
    id_hash: bytes
    identity_id: int
    csrf_token: str = field(repr=False)  # encrypted at rest
    created_at: float = 0.0
    last_seen_at: float = 0.0
    expires_at: float = 0.0


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: float
    kind: str  # connection.created, connection.refreshed, key.created, login.failed, ...
    outcome: str  # ok | failed | ...
    identity: str | None = None
    provider: str | None = None
    detail: str | None = None
    id: int = 0


@dataclass(frozen=True, slots=True)
class ReencryptReport:
    """What one ``Store.reencrypt`` run did, in rows."""

    reencrypted: int = 0  # rows whose secrets were sealed again under the current key
    unreadable: int = 0  # rows no configured key could decrypt; left exactly as they were


class Store(Protocol):
    """Persistence for identities, keys, connections, pending authorizations and sessions."""

    async def open(self) -> None:
        """Connect and apply pending migrations (never recreating existing data)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the store cannot be reached (readiness)."""

    # identities -------------------------------------------------------------
    async def create_identity(self, name: str, password_hash: str | None, now: float) -> Identity:
        """Raise ``BadRequest`` if the name exists."""

    async def get_identity(self, name: str) -> Identity | None: ...
    async def get_identity_by_id(self, identity_id: int) -> Identity | None: ...
    async def list_identities(self) -> Sequence[Identity]: ...

    async def delete_identity(self, name: str) -> bool:
        """Delete the identity with its keys, connections, sessions and pending grants."""

    async def set_password(self, name: str, password_hash: str | None) -> bool: ...

    # API keys ---------------------------------------------------------------
    async def add_api_key(self, identity_id: int, key_hash: bytes, prefix: str,
                          now: float) -> ApiKey: ...

    async def find_api_key(self, key_hash: bytes) -> tuple[ApiKey, Identity] | None:
        """The unrevoked key with this hash, and its identity."""

    async def list_api_keys(self, identity_id: int) -> Sequence[ApiKey]: ...

    async def revoke_api_key(self, identity_id: int, prefix: str, now: float) -> bool:
        """Revoke the identity's unrevoked key whose prefix is ``prefix``."""

    async def touch_api_keys(self, last_used: Mapping[int, float]) -> None:
        """Record last-use times in one batch (the hot path never writes per request)."""

    # connections ------------------------------------------------------------
    async def get_connection(self, identity_id: int, provider: str) -> Connection | None: ...

    async def list_connections(self, identity_id: int | None = None) -> Sequence[Connection]: ...

    async def put_connection(self, identity_id: int, provider: str, tokens: TokenFields,
                             account_id: str | None, now: float) -> Connection:
        """Create or atomically replace a connection after consent; status becomes active."""

    async def update_tokens(self, identity_id: int, provider: str, expected_version: int,
                            tokens: TokenFields, now: float) -> Connection | None:
        """Compare-and-set after a refresh; ``None`` when the version moved (or row gone)."""

    async def set_status(self, identity_id: int, provider: str,
                         status: ConnectionStatus, now: float) -> Connection | None: ...

    async def delete_connection(self, identity_id: int, provider: str) -> bool: ...

    def refresh_lock(self, identity_id: int, provider: str,
                     timeout: float) -> AbstractAsyncContextManager[bool]:
        """Exclusive across processes and hosts sharing this store; released if the holder
        dies. Yields False if not acquired within ``timeout`` seconds."""

    # pending authorizations (OAuth state) -----------------------------------
    async def add_pending(self, pending: PendingAuthorization) -> None: ...

    async def take_pending(self, state_hash: bytes, now: float) -> PendingAuthorization | None:
        """Atomically remove and return an unexpired pending authorization (single use)."""

    async def count_pending(self, identity_id: int, now: float) -> int: ...

    async def use_link(self, link_id: bytes, expires_at: float, now: float) -> bool:
        """Mark a signed connect link used; False if it was used already (single use)."""

    # web sessions -----------------------------------------------------------
    async def add_session(self, session: WebSession) -> None: ...
    async def get_session(self, id_hash: bytes, now: float) -> WebSession | None: ...
    async def touch_session(self, id_hash: bytes, now: float) -> None: ...
    async def delete_session(self, id_hash: bytes) -> None: ...

    # audit & housekeeping ---------------------------------------------------
    async def add_audit(self, event: AuditEvent) -> None: ...

    async def list_audit(self, identity: str | None = None, since: float | None = None,
                         limit: int = 1000) -> Sequence[AuditEvent]: ...

    async def purge_expired(self, now: float, audit_before: float | None = None) -> None:
        """Drop expired pending authorizations, used links, sessions and old audit rows."""

    # encryption keys ---------------------------------------------------------
    async def reencrypt(self, batch: int = 500) -> ReencryptReport:
        """Seal every stored secret that is not under the current key again under it (key
        rotation), ``batch`` rows per transaction, while other instances keep using the
        store: a concurrent refresh is never overwritten, and no plaintext changes."""

    async def count_stale_secrets(self) -> int:
        """Rows holding a secret not sealed with the current key (0: old keys can go)."""

    async def server_secret(self, name: str, initial: bytes) -> bytes:
        """A server-side secret kept in the store (encrypted like tokens, so it survives key
        rotation): stored as ``initial`` by the first caller, the stored value for all."""
