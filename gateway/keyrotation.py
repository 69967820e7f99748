"""``gateway rotate-key``: move every stored secret to a new encryption key while serving.

Theory of operation
-------------------
A ciphertext names the key that sealed it (:mod:`gateway.tokens.crypto`), and every gateway
decrypts with ``encryption_key`` or any key in ``encryption_keys_old``. A rotation is therefore
three config changes around one store walk, and no instance ever meets a ciphertext it cannot
read:

1. ``gateway rotate-key`` with nothing to do generates a key and prints the steps: make it
   ``encryption_key`` on every instance, move the current key to ``encryption_keys_old``,
   restart. New tokens are then sealed with the new key, old ones still decrypt.
2. ``gateway rotate-key`` again: :meth:`Store.reencrypt` seals every remaining secret under
   the new key, batch by batch, with compare-and-set so a refresh running meanwhile is never
   overwritten (see :mod:`gateway.store._rekey`). It reports what is left under old keys.
3. Once nothing is, drop ``encryption_keys_old`` and restart.

``--new-key KEY`` starts a rotation to a key made elsewhere (a secret manager) instead of a
generated one; it is never printed. Re-encryption always targets the config's current key, the
one every restarted instance knows.

Gateway keys are stored as HMACs under a key *derived* from a secret, not encrypted: if that
secret were the encryption key, a rotation would invalidate every gateway key. So the HMAC key
lives in the store as a server secret (sealed like tokens, re-encrypted by the rotation), and
is pinned there with the value the current key derives before a rotation starts, which keeps
existing gateway keys valid (:func:`api_key_mac`).

Output never contains a secret, except the generated key as the last line of step 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TextIO

from gateway.config import Config
from gateway.errors import BadRequest, ConfigError, GatewayError
from gateway.store import create_store
from gateway.store.base import Store
from gateway.tokens.crypto import SecretBox, box_from_config, decode_key, derive, generate_key

API_KEY_SECRET = "api-key-hmac"  # noqa: S105 (the name of a stored secret, not a secret)
DEFAULT_BATCH = 500

Phase = Literal["start", "reencrypt", "done"]
Say = Callable[[str], None]


async def api_key_mac(store: Store, box: SecretBox) -> bytes:
    """The HMAC key for gateway-key hashes: pinned in the store on first call (with the value
    earlier versions derived from the encryption key, so existing keys keep working) and
    independent of the encryption key from then on."""
    return await store.server_secret(API_KEY_SECRET, derive(box.root_key, "api-key"))


def decide(stale: int, has_old_keys: bool, new_key: bytes | None, current: bytes) -> Phase:
    """What ``rotate-key`` does: start a rotation, re-encrypt, or report that it is done."""
    if new_key is not None and new_key != current:
        return "start"
    if stale > 0:
        return "reencrypt"
    return "done" if has_old_keys else "start"


@dataclass(frozen=True, slots=True)
class Request:
    """The command line, parsed: ``new_key`` is the raw text (``-``: read from stdin)."""

    new_key: str | None = None
    batch: int = DEFAULT_BATCH
    status: bool = False


def parse_new_key(text: str, stdin: TextIO) -> bytes:
    """``--new-key``'s value (``-``: the first line of stdin), decoded; BadRequest if bad."""
    if text == "-":
        text = stdin.readline().strip()
        if not text:
            raise BadRequest("--new-key -: standard input held no key")
    try:
        return decode_key(text, "--new-key")
    except ConfigError:
        raise BadRequest("--new-key: must be 32 bytes in URL-safe base64 (create one with "
                         "`gateway keygen`)") from None


def run(cfg: Config, request: Request, out: Say, warn: Say, stdin: TextIO) -> int:
    """The whole command; returns the exit code (raises BadRequest / GatewayError)."""
    new_key = None if request.new_key is None else parse_new_key(request.new_key, stdin)
    if isinstance(request.batch, bool) or request.batch < 1:
        raise BadRequest("--batch: must be a whole number of at least 1")
    box = box_from_config(cfg.encryption_key, cfg.encryption_key_file, cfg.encryption_keys_old)
    return asyncio.run(_run(cfg, box, new_key, request, out, warn))


async def _run(cfg: Config, box: SecretBox, new_key: bytes | None, request: Request, out: Say,
               warn: Say) -> int:
    store = create_store(cfg.store, box)
    try:
        await store.open()
    except GatewayError as e:
        raise GatewayError(f"cannot open the store: {e.message}") from None
    try:
        stale = await store.count_stale_secrets()
        if request.status:
            out(f"{stale} stored rows hold a secret not yet under the current encryption_key.")
            if stale:
                out("Run `gateway rotate-key` to re-encrypt them.")
            return 0
        phase = decide(stale, bool(cfg.encryption_keys_old), new_key, box.root_key)
        if phase == "done":
            out("All stored secrets are under the current encryption_key; nothing to "
                "re-encrypt.")
            out("encryption_keys_old is no longer needed: remove it from the config of every "
                "instance and restart them.")
            return 0
        if phase == "start":
            # Before any instance switches keys, so that existing gateway keys stay valid.
            await api_key_mac(store, box)
            _print_start(out, stale, generated=None if new_key is not None else generate_key())
            return 0
        report = await store.reencrypt(request.batch)
        left = await store.count_stale_secrets()
    finally:
        await store.close()
    out(f"Re-encrypted {report.reencrypted} stored rows under the current encryption_key "
        f"(in transactions of at most {request.batch} rows).")
    code = 0
    if report.unreadable:
        warn(f"{report.unreadable} rows hold a secret that no configured key can decrypt "
             "(was a key dropped from encryption_keys_old too early?); they were left "
             "unchanged")
        code = 1
    if left > report.unreadable:
        warn(f"{left - report.unreadable} rows were sealed with an old key while this ran "
             "(an instance still encrypting with it?); restart every instance with the new "
             "encryption_key, then run `gateway rotate-key` again")
        code = 1
    if code == 0:
        out("No stored secret is under an old key any more: remove encryption_keys_old "
            "from the config of every instance and restart them.")
    return code


def _print_start(out: Say, stale: int, generated: str | None) -> None:
    key = "the new key printed below" if generated else "the key given with --new-key"
    out(f"To rotate to {key}, while the gateway keeps serving:")
    out("  1. On every instance, set encryption_key to the new key and move the current key")
    out("     to encryption_keys_old (restarting instances one by one: see docs/scaling.md).")
    out("  2. Restart every instance (`gateway reload` does not change keys).")
    out("  3. Run `gateway rotate-key`: it re-encrypts every stored secret under the new key.")
    out("  4. Once it reports that no secret is left under an old key, remove")
    out("     encryption_keys_old and restart again.")
    if stale:
        out(f"Note: {stale} stored rows are still under an older key; step 3 re-encrypts "
            "them too, as long as that key stays in encryption_keys_old.")
    if generated is not None:
        out("Keep the new key as secret as the current one. New encryption key:")
        out(generated)
