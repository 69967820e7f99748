-- Initial schema. Secrets are stored only as AES-GCM ciphertexts (bytea) or hashes.
-- Times are POSIX seconds (double precision). Deleting an identity cascades to everything
-- it owns; audit rows name the identity as text so they outlive it.

CREATE TABLE identities (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    password_hash TEXT,
    created_at    DOUBLE PRECISION NOT NULL
);

CREATE TABLE api_keys (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    identity_id  BIGINT NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    key_hash     BYTEA NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    last_used_at DOUBLE PRECISION,
    revoked_at   DOUBLE PRECISION
);
CREATE INDEX api_keys_identity ON api_keys (identity_id);

CREATE TABLE connections (
    identity_id   BIGINT NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    provider      TEXT NOT NULL,
    access_token  BYTEA NOT NULL,
    refresh_token BYTEA,
    token_type    TEXT NOT NULL,
    expires_at    DOUBLE PRECISION,
    scopes        JSONB NOT NULL DEFAULT '[]',
    extra         JSONB NOT NULL DEFAULT '{}',
    account_id    TEXT,
    status        TEXT NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'reconsent_required')),
    version       BIGINT NOT NULL DEFAULT 1,
    created_at    DOUBLE PRECISION NOT NULL,
    updated_at    DOUBLE PRECISION NOT NULL,
    refreshed_at  DOUBLE PRECISION,
    PRIMARY KEY (identity_id, provider)
);

CREATE TABLE pending_authorizations (
    state_hash    BYTEA PRIMARY KEY,
    identity_id   BIGINT NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    provider      TEXT NOT NULL,
    code_verifier BYTEA,
    nonce         TEXT,
    return_to     TEXT,
    created_at    DOUBLE PRECISION NOT NULL,
    expires_at    DOUBLE PRECISION NOT NULL
);
CREATE INDEX pending_identity ON pending_authorizations (identity_id);

CREATE TABLE used_links (
    link_id    BYTEA PRIMARY KEY,
    expires_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE sessions (
    id_hash      BYTEA PRIMARY KEY,
    identity_id  BIGINT NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    csrf_token   BYTEA NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    last_seen_at DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL
);
CREATE INDEX sessions_identity ON sessions (identity_id);

CREATE TABLE audit_events (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       DOUBLE PRECISION NOT NULL,
    kind     TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    identity TEXT,
    provider TEXT,
    detail   TEXT
);
