"""Encryption at rest for tokens, PKCE verifiers and other stored secrets.

AES-256-GCM (authenticated). Each ciphertext is ``b"\\x01" + key_id(4) + nonce(12) + ct``:
the key id lets older keys keep decrypting after a rotation; the caller's *context* (the
row's identity, provider and field) is bound as associated data, so a ciphertext copied onto
another row fails authentication instead of decrypting into the wrong account's token.

Keys are 32 random bytes, written as URL-safe base64 (what ``gateway keygen`` prints).
Derived sub-keys (HMAC for connect links, hashing API keys) come from HKDF so no key is used
for two purposes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import ConfigError, DecryptionError

_VERSION = b"\x01"
_HEADER = 1 + 4 + 12


def generate_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def decode_key(text: str, where: str = "encryption_key") -> bytes:
    s = text.strip()
    try:
        raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(where, "must be 32 bytes in URL-safe base64; create one with `gateway keygen`")
    return raw


def load_or_create_key_file(path: Path) -> str:
    """Read the key file, creating it (mode 0600) on first start so the shipped config runs."""
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    key = generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker won the race
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key + "\n")
    return key


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"gateway key id\x00" + key).digest()[:4]


def derive(key: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"gateway/" + purpose.encode()).derive(key)


class SecretBox:
    """Encrypts with the current key; decrypts with any known key, chosen by key id."""

    __slots__ = ("_current", "_current_id", "_keys", "root_key")

    def __init__(self, current: bytes, old: Iterable[bytes] = ()) -> None:
        self.root_key = current
        self._current_id = _key_id(current)
        self._current = AESGCM(derive(current, "aead"))
        self._keys = {_key_id(k): AESGCM(derive(k, "aead")) for k in old}
        self._keys[self._current_id] = self._current

    @property
    def key_id(self) -> bytes:
        return self._current_id

    def encrypt(self, plaintext: str, context: str) -> bytes:
        nonce = secrets.token_bytes(12)
        ct = self._current.encrypt(nonce, plaintext.encode(), context.encode())
        return _VERSION + self._current_id + nonce + ct

    def decrypt(self, blob: bytes, context: str) -> str:
        blob = bytes(blob)
        if len(blob) < _HEADER + 16 or blob[:1] != _VERSION:
            raise DecryptionError("stored secret is malformed")
        aead = self._keys.get(blob[1:5])
        if aead is None:
            raise DecryptionError("stored secret was encrypted with an unknown key "
                                  "(wrong encryption_key, or an old key missing from encryption_keys_old)")
        try:
            return aead.decrypt(blob[5:17], blob[17:], context.encode()).decode()
        except InvalidTag:
            raise DecryptionError("stored secret failed authentication (tampered or moved)") from None

    def is_current(self, blob: bytes) -> bool:
        return bytes(blob[1:5]) == self._current_id

    def encrypt_opt(self, plaintext: str | None, context: str) -> bytes | None:
        return None if plaintext is None else self.encrypt(plaintext, context)

    def decrypt_opt(self, blob: bytes | None, context: str) -> str | None:
        return None if blob is None else self.decrypt(blob, context)


def box_from_config(encryption_key: str | None, key_file: Path | None,
                    old_keys: Iterable[str] = ()) -> SecretBox:
    """The SecretBox for a config: an explicit key, or a key file created on first start."""
    if encryption_key:
        current = decode_key(encryption_key, "encryption_key")
    elif key_file is not None:
        current = decode_key(load_or_create_key_file(key_file), f"encryption_key_file ({key_file})")
    else:
        raise ConfigError("encryption_key", "is required (or encryption_key_file); "
                          "create one with `gateway keygen`")
    old = [decode_key(k, f"encryption_keys_old[{i}]") for i, k in enumerate(old_keys)]
    return SecretBox(current, old)
