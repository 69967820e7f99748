"""What both backends share without doing I/O: encryption contexts, row <-> record conversion,
input checks and the migration files.

Every secret is sealed with a context naming the row and field it belongs to, so a ciphertext
copied onto another row (or field) fails authentication instead of decrypting into the wrong
account. Rows are anything indexable by column name (``sqlite3.Row``, ``asyncpg.Record``).
"""

from __future__ import annotations

import importlib.resources
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import BadRequest
from gateway.store.base import (
    ApiKey,
    AuditEvent,
    Connection,
    Identity,
    PendingAuthorization,
    TokenFields,
    WebSession,
)
from gateway.tokens.crypto import SecretBox

STATUSES = ("active", "reconsent_required")


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


# --------------------------------------------------------------------------- contexts


def conn_context(identity_id: int, provider: str, field: str) -> str:
    return f"conn/{identity_id}/{provider}/{field}"


def pending_context(state_hash: bytes) -> str:
    return f"pending/{bytes(state_hash).hex()}/code_verifier"


def session_context(id_hash: bytes) -> str:
    return f"session/{bytes(id_hash).hex()}/csrf"


def secret_context(name: str) -> str:
    return f"secret/{name}/value"


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class SealedTokens:
    """A :class:`TokenFields` as columns: secrets encrypted, lists and maps as JSON text."""

    access_token: bytes
    refresh_token: bytes | None
    token_type: str
    expires_at: float | None
    scopes: str
    extra: str


def check_tokens(tokens: TokenFields) -> None:
    """Reject token fields that could not have come from a sane token response."""
    if not isinstance(tokens.access_token, str) or not tokens.access_token:
        raise BadRequest("the access token must be a non-empty string")
    if tokens.refresh_token is not None and (
            not isinstance(tokens.refresh_token, str) or not tokens.refresh_token):
        raise BadRequest("the refresh token must be a non-empty string or absent")
    if not isinstance(tokens.token_type, str) or not tokens.token_type:
        raise BadRequest("the token type must be a non-empty string")
    if tokens.expires_at is not None and (
            isinstance(tokens.expires_at, bool) or not isinstance(tokens.expires_at, int | float)
            or not math.isfinite(tokens.expires_at)):
        raise BadRequest("expires_at must be a finite number of seconds or absent")
    if any(not isinstance(s, str) for s in tokens.scopes):
        raise BadRequest("scopes must be strings")
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in tokens.extra.items()):
        raise BadRequest("extra token fields must map strings to strings")


def seal_tokens(box: SecretBox, identity_id: int, provider: str,
                tokens: TokenFields) -> SealedTokens:
    check_tokens(tokens)
    return SealedTokens(
        access_token=box.encrypt(tokens.access_token,
                                 conn_context(identity_id, provider, "access_token")),
        refresh_token=box.encrypt_opt(tokens.refresh_token,
                                      conn_context(identity_id, provider, "refresh_token")),
        token_type=tokens.token_type,
        expires_at=None if tokens.expires_at is None else float(tokens.expires_at),
        scopes=json.dumps(list(tokens.scopes)),
        extra=json.dumps(dict(tokens.extra), sort_keys=True),
    )


def _t(value: Any) -> Any:
    """Times as floats (SQLite hands back whole-second REALs as ints)."""
    return None if value is None else float(value)


def _json(value: Any) -> Any:
    # asyncpg hands jsonb back as text; tolerate an already-decoded value too.
    return json.loads(value) if isinstance(value, str | bytes) else value


def connection_from_row(box: SecretBox, row: Row) -> Connection:
    identity_id, provider = int(row["identity_id"]), str(row["provider"])
    extra: Mapping[str, Any] = _json(row["extra"]) or {}
    tokens = TokenFields(
        access_token=box.decrypt(row["access_token"],
                                 conn_context(identity_id, provider, "access_token")),
        refresh_token=box.decrypt_opt(row["refresh_token"],
                                      conn_context(identity_id, provider, "refresh_token")),
        token_type=row["token_type"],
        expires_at=_t(row["expires_at"]),
        scopes=tuple(str(s) for s in _json(row["scopes"]) or ()),
        extra={str(k): str(v) for k, v in extra.items()},
    )
    return Connection(
        identity_id=identity_id,
        provider=provider,
        tokens=tokens,
        account_id=row["account_id"],
        status=row["status"],
        version=int(row["version"]),
        created_at=_t(row["created_at"]),
        updated_at=_t(row["updated_at"]),
        refreshed_at=_t(row["refreshed_at"]),
    )


# --------------------------------------------------------------------------- other records


def identity_from_row(row: Row) -> Identity:
    return Identity(id=int(row["id"]), name=row["name"], password_hash=row["password_hash"],
                    created_at=_t(row["created_at"]))


def api_key_from_row(row: Row) -> ApiKey:
    return ApiKey(id=int(row["id"]), identity_id=int(row["identity_id"]), prefix=row["prefix"],
                  created_at=_t(row["created_at"]), last_used_at=_t(row["last_used_at"]),
                  revoked_at=_t(row["revoked_at"]))


def seal_pending(box: SecretBox, pending: PendingAuthorization) -> bytes | None:
    return box.encrypt_opt(pending.code_verifier, pending_context(pending.state_hash))


def pending_from_row(box: SecretBox, row: Row) -> PendingAuthorization:
    state_hash = bytes(row["state_hash"])
    return PendingAuthorization(
        state_hash=state_hash,
        identity_id=int(row["identity_id"]),
        provider=row["provider"],
        code_verifier=box.decrypt_opt(row["code_verifier"], pending_context(state_hash)),
        nonce=row["nonce"],
        return_to=row["return_to"],
        created_at=_t(row["created_at"]),
        expires_at=_t(row["expires_at"]),
    )


def seal_session(box: SecretBox, session: WebSession) -> bytes:
    if not isinstance(session.csrf_token, str) or not session.csrf_token:
        raise BadRequest("the session's CSRF token must be a non-empty string")
    return box.encrypt(session.csrf_token, session_context(session.id_hash))


def session_from_row(box: SecretBox, row: Row) -> WebSession:
    id_hash = bytes(row["id_hash"])
    return WebSession(
        id_hash=id_hash,
        identity_id=int(row["identity_id"]),
        csrf_token=box.decrypt(row["csrf_token"], session_context(id_hash)),
        created_at=_t(row["created_at"]),
        last_seen_at=_t(row["last_seen_at"]),
        expires_at=_t(row["expires_at"]),
    )


def audit_from_row(row: Row) -> AuditEvent:
    return AuditEvent(at=_t(row["at"]), kind=row["kind"], outcome=row["outcome"],
                      identity=row["identity"], provider=row["provider"], detail=row["detail"],
                      id=int(row["id"]))


# --------------------------------------------------------------------------- migrations

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str = ""


def load_migrations(dialect: str) -> tuple[Migration, ...]:
    """The ``migrations/<dialect>/NNNN_name.sql`` files in order; versions must run 1..n."""
    folder = importlib.resources.files("gateway.store") / "migrations" / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        m = _MIGRATION_FILE.match(entry.name)
        if m:
            found.append(Migration(int(m[1]), m[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    if [mig.version for mig in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{dialect} migrations are not numbered 0001..{len(found):04d}")
    return tuple(found)


def too_new(current: int, known: int) -> str:
    return (f"the database schema is at version {current}, newer than this gateway knows "
            f"({known}); upgrade the gateway")
