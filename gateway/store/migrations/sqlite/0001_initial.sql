-- Initial schema. Secrets are stored only as AES-GCM ciphertexts (BLOB) or hashes.
-- Times are POSIX seconds (REAL). Deleting an identity cascades to everything it owns;
-- audit rows name the identity as text so they outlive it.

CREATE TABLE identities (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE,
    password_hash TEXT,
    created_at    REAL NOT NULL
);

CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_id  INTEGER NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    key_hash     BLOB NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    created_at   REAL NOT NULL,
    last_used_at REAL,
    revoked_at   REAL
);
CREATE INDEX api_keys_identity ON api_keys (identity_id);

CREATE TABLE connections (
    identity_id   INTEGER NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    provider      TEXT NOT NULL,
    access_token  BLOB NOT NULL,
    refresh_token BLOB,
    token_type    TEXT NOT NULL,
    expires_at    REAL,
    scopes        TEXT NOT NULL DEFAULT '[]',
    extra         TEXT NOT NULL DEFAULT '{}',
    account_id    TEXT,
    status        TEXT NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'reconsent_required')),
    version       INTEGER NOT NULL DEFAULT 1,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    refreshed_at  REAL,
    PRIMARY KEY (identity_id, provider)
);

CREATE TABLE pending_authorizations (
    state_hash    BLOB PRIMARY KEY,
    identity_id   INTEGER NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    provider      TEXT NOT NULL,
    code_verifier BLOB,
    nonce         TEXT,
    return_to     TEXT,
    created_at    REAL NOT NULL,
    expires_at    REAL NOT NULL
);
CREATE INDEX pending_identity ON pending_authorizations (identity_id);

CREATE TABLE used_links (
    link_id    BLOB PRIMARY KEY,
    expires_at REAL NOT NULL
);

CREATE TABLE sessions (
    id_hash      BLOB PRIMARY KEY,
    identity_id  INTEGER NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    csrf_token   BLOB NOT NULL,
    created_at   REAL NOT NULL,
    last_seen_at REAL NOT NULL,
    expires_at   REAL NOT NULL
);
CREATE INDEX sessions_identity ON sessions (identity_id);

CREATE TABLE audit_events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       REAL NOT NULL,
    kind     TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    identity TEXT,
    provider TEXT,
    detail   TEXT
);
