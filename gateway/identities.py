"""Local identities: names, passwords and gateway API keys.

Two very different secrets live here, so they get different hashes:

* **Passwords** are chosen by people and guessable, so they get scrypt (memory-hard), with
  the parameters and salt in the encoded string so they can be raised later. The KDF takes
  tens of milliseconds of CPU, so it always runs in a worker thread, never on the event loop.
  Verifying an unknown name still runs the KDF, so timing does not reveal which names exist.
* **API keys** are 256 random bits (``gwk_`` + 43 URL-safe base64 characters). Guessing is
  hopeless, so a fast keyed hash is enough: HMAC-SHA256 under a sub-key derived from the
  encryption key. The store only ever sees that hash and a short display prefix.

The proxy authenticates every request with :meth:`IdentityService.authenticate_key`, so it
caches positive lookups for a few seconds (a revocation made by another process is honoured
once the entry expires; one made through this service evicts at once) and batches
``last_used`` updates, which the app flushes periodically with :meth:`flush_last_used`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.errors import BadRequest, GatewayError
from gateway.store.base import ApiKey, AuditEvent, Identity, Store
from gateway.tokens.crypto import SecretBox, derive

log = logging.getLogger("gateway.identities")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
KEY_SCHEME = "gwk_"
KEY_LENGTH = len(KEY_SCHEME) + 43  # 32 random bytes, unpadded URL-safe base64
PREFIX_LENGTH = 12
_KEY_PATTERN = re.compile(r"gwk_[A-Za-z0-9_-]{43}")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024

# scrypt cost: N=2^15, r=8, p=1 uses 32 MiB and ~60 ms per hash (RFC 7914 §2). Stored hashes
# carry their own parameters; verification accepts up to the bounds below, so a tampered row
# cannot make us allocate unbounded memory.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16
_DKLEN = 32


# --------------------------------------------------------------------------- pure helpers


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid identity name, else raise BadRequest."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise BadRequest("identity names are 1-64 characters: letters, digits and _ . @ -, "
                         "starting with a letter or digit")
    return name


def validate_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise BadRequest(f"passwords must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long")
    return password


def new_api_key() -> str:
    """A fresh gateway key: ``gwk_`` followed by 256 random bits in URL-safe base64."""
    return KEY_SCHEME + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def key_prefix(key: str) -> str:
    """The non-secret part shown in listings and used to revoke (``gwk_`` + 8 chars)."""
    return key[:PREFIX_LENGTH]


def looks_like_key(key: str) -> bool:
    return bool(_KEY_PATTERN.fullmatch(key))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * r * (n + p + 2), dklen=_DKLEN)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R,
                  p: int = SCRYPT_P) -> str:
    """``scrypt$N$r$p$salt$hash`` (salt and hash in URL-safe base64). Blocking: use a thread."""
    salt = secrets.token_bytes(16)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p))}"


def check_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against :func:`hash_password` output. Blocking."""
    try:
        scheme, n_s, r_s, p_s, salt_s, hash_s = encoded.split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        salt, expected = _unb64(salt_s), _unb64(hash_s)
    except (ValueError, binascii.Error):
        return False
    if (scheme != "scrypt" or not (2 <= n <= _MAX_N) or n & (n - 1) or not 1 <= r <= _MAX_R
            or not 1 <= p <= _MAX_P or len(expected) != _DKLEN):
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


# --------------------------------------------------------------------------- the service


@dataclass(frozen=True, slots=True)
class _Cached:
    identity: Identity
    key: ApiKey
    until: float


class IdentityService:
    """Identity, password and API-key operations shared by the CLI, the web pages and the
    proxy's hot path. Every method validates its input before touching the store."""

    def __init__(self, store: Store, box: SecretBox, clock: Callable[[], float] = time.time, *,
                 cache_ttl: float = 5.0, cache_size: int = 10_000,
                 mac_key: bytes | None = None) -> None:
        """``mac_key`` is the key-hash secret pinned in the store
        (:func:`gateway.keyrotation.api_key_mac`), so keys survive an encryption-key
        rotation; without it the key is derived from the current encryption key."""
        self._store = store
        self._mac_key = mac_key if mac_key is not None else derive(box.root_key, "api-key")
        self._clock = clock
        self._ttl = cache_ttl
        self._size = cache_size
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[tuple[ApiKey, Identity] | None]] = {}
        self._generation = 0  # bumped on every eviction
        self._last_used: dict[int, float] = {}
        self._dummy_hash: str | None = None

    # -- keys ---------------------------------------------------------------

    def hash_key(self, key: str) -> bytes:
        return hmac.new(self._mac_key, key.encode(), hashlib.sha256).digest()

    async def authenticate_key(self, key: str) -> Identity | None:
        """The identity owning an unrevoked key, or None. No store write on this path."""
        if not looks_like_key(key):
            return None
        digest = self.hash_key(key)
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit.until > now:
            self._last_used[hit.key.id] = now
            return hit.identity
        generation = self._generation
        found = await self._lookup(digest)
        if found is None:
            return None
        api_key, identity = found
        if generation == self._generation:  # no revocation raced with the lookup
            self._cache[digest] = _Cached(identity, api_key, now + self._ttl)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._last_used[api_key.id] = now
        return identity

    async def _lookup(self, digest: bytes) -> tuple[ApiKey, Identity] | None:
        """One store query per key however many requests arrive at once with it uncached;
        a caller that gives up (cancelled) does not cancel the query for the others."""
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._store.find_api_key(digest))
            self._inflight[digest] = task

            def done(t: asyncio.Future[tuple[ApiKey, Identity] | None]) -> None:
                if self._inflight.get(digest) is t:
                    del self._inflight[digest]
                if not t.cancelled():
                    t.exception()  # mark retrieved; the awaiting callers re-raise it

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def flush_last_used(self) -> int:
        """Write batched last-use times; on failure they are kept for the next flush."""
        if not self._last_used:
            return 0
        batch, self._last_used = self._last_used, {}
        try:
            await self._store.touch_api_keys(batch)
        except BaseException:
            for key_id, at in batch.items():
                self._last_used[key_id] = max(at, self._last_used.get(key_id, at))
            raise
        return len(batch)

    def _evict(self, identity_id: int, prefix: str | None = None) -> None:
        self._generation += 1
        for digest, c in list(self._cache.items()):
            if c.identity.id == identity_id and (prefix is None or c.key.prefix == prefix):
                del self._cache[digest]

    async def add_key(self, name: str) -> str:
        """Create a key for ``name``; the only time the key exists outside the client."""
        identity = await self._require(name)
        key = await self._new_key(identity)
        await self._audit("key.created", identity.name, f"prefix={key_prefix(key)}")
        return key

    async def _new_key(self, identity: Identity) -> str:
        key = new_api_key()
        await self._store.add_api_key(identity.id, self.hash_key(key), key_prefix(key),
                                      self._clock())
        return key

    async def revoke_key(self, name: str, prefix: str) -> None:
        identity = await self._require(name)
        prefix = prefix.strip()
        if looks_like_key(prefix):  # the whole key was given: fine, we know what it means
            prefix = key_prefix(prefix)
        if not prefix.startswith(KEY_SCHEME) or len(prefix) != PREFIX_LENGTH:
            raise BadRequest(f"a key prefix is the first {PREFIX_LENGTH} characters of the key, "
                             f"as shown by `gateway identity key list {identity.name}`")
        if not await self._store.revoke_api_key(identity.id, prefix, self._clock()):
            raise BadRequest(f"identity '{identity.name}' has no active key {prefix}")
        self._evict(identity.id, prefix)
        await self._audit("key.revoked", identity.name, f"prefix={prefix}")

    async def list_keys(self, name: str) -> Sequence[ApiKey]:
        identity = await self._require(name)
        return await self._store.list_api_keys(identity.id)

    # -- identities ---------------------------------------------------------

    async def get_identity(self, name: str) -> Identity | None:
        if not NAME_PATTERN.fullmatch(name):
            return None
        return await self._store.get_identity(name)

    async def _require(self, name: str) -> Identity:
        validate_name(name)
        identity = await self._store.get_identity(name)
        if identity is None:
            raise BadRequest(f"identity '{name}' does not exist")
        return identity

    async def add_identity(self, name: str, password: str | None = None
                           ) -> tuple[Identity, str]:
        """Create an identity with its first API key; returns (identity, key)."""
        validate_name(name)
        if password is not None:
            validate_password(password)
        if await self._store.get_identity(name) is not None:
            raise BadRequest(f"identity '{name}' already exists")
        pw_hash = None
        if password is not None:
            pw_hash = await asyncio.to_thread(hash_password, password)
        identity = await self._store.create_identity(name, pw_hash, self._clock())
        try:
            key = await self._new_key(identity)
        except BaseException:
            # All or nothing: an identity whose only key was never shown is useless.
            await asyncio.shield(self._store.delete_identity(name))
            raise
        await self._audit("identity.created", name, f"prefix={key_prefix(key)}")
        return identity, key

    async def list_identities(self) -> Sequence[Identity]:
        """People and programs; internal owners (``_gateway`` holds client-credentials
        tokens) are not identities anyone can log in as, so they are not listed."""
        return [i for i in await self._store.list_identities() if NAME_PATTERN.match(i.name)]

    async def remove_identity(self, name: str) -> None:
        identity = await self._require(name)
        if not await self._store.delete_identity(name):
            raise BadRequest(f"identity '{name}' does not exist")
        self._evict(identity.id)
        await self._audit("identity.removed", name)

    async def set_password(self, name: str, password: str | None) -> None:
        """Set (or with None, clear: no web login) the identity's password."""
        validate_name(name)
        pw_hash = None
        if password is not None:
            pw_hash = await asyncio.to_thread(hash_password, validate_password(password))
        if not await self._store.set_password(name, pw_hash):
            raise BadRequest(f"identity '{name}' does not exist")
        await self._audit("password.changed" if pw_hash else "password.cleared", name)

    async def verify_password(self, name: str, password: str) -> Identity | None:
        """The identity if ``password`` is right. Costs one KDF run whatever the outcome."""
        identity = await self.get_identity(name) if len(password) <= MAX_PASSWORD else None
        if identity is None or identity.password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = await asyncio.to_thread(hash_password, secrets.token_hex(8))
            await asyncio.to_thread(check_password, password[:MAX_PASSWORD], self._dummy_hash)
            return None
        ok = await asyncio.to_thread(check_password, password, identity.password_hash)
        return identity if ok else None

    async def _audit(self, kind: str, identity: str, detail: str | None = None) -> None:
        """Best effort: the change already happened and (for keys) must still be shown."""
        try:
            await self._store.add_audit(AuditEvent(at=self._clock(), kind=kind, outcome="ok",
                                                   identity=identity, detail=detail))
        except (GatewayError, OSError) as e:
            log.warning("could not record audit event %s: %s", kind, type(e).__name__)
