-- Server-side secrets (e.g. the HMAC key for gateway-key hashes), sealed with the encryption
-- key like tokens, so that rotating the encryption key re-encrypts them instead of changing
-- them.

CREATE TABLE server_secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
