"""Signed connect links: a program asks for one, a person opens it in a browser.

A link carries ``identity id, provider, expiry, nonce`` and an HMAC-SHA256 over them with a
key derived from the encryption key (so no extra secret to configure, and every instance
sharing the store and key accepts it). Links are short-lived (<= 10 minutes) and single-use:
the store records the nonce when the link is redeemed. Pure: no I/O, clock passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from gateway.errors import BadRequest


@dataclass(frozen=True, slots=True)
class ConnectLink:
    identity_id: int
    provider: str
    expires_at: float
    nonce: str

    @property
    def link_id(self) -> bytes:
        return hashlib.sha256(b"link\x00" + self.nonce.encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(key: bytes, identity_id: int, provider: str, now: float, ttl: float) -> tuple[str, ConnectLink]:
    link = ConnectLink(identity_id, provider, float(int(now + ttl)), secrets.token_urlsafe(16))
    payload = json.dumps({"i": identity_id, "p": provider, "e": int(link.expires_at),
                          "n": link.nonce}, separators=(",", ":")).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}", link


def verify(key: bytes, token: str, provider: str, now: float) -> ConnectLink:
    """Check signature, provider and expiry; single use is the caller's (store's) job."""
    try:
        payload_s, mac_s = token.split(".", 1)
        payload, mac = _unb64(payload_s), _unb64(mac_s)
    except ValueError:
        raise BadRequest("This connect link is malformed.") from None
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise BadRequest("This connect link is not valid.")
    try:
        data = json.loads(payload)
        link = ConnectLink(int(data["i"]), str(data["p"]), float(data["e"]), str(data["n"]))
    except (ValueError, KeyError, TypeError):
        raise BadRequest("This connect link is malformed.") from None
    if link.provider != provider:
        raise BadRequest("This connect link is for another provider.")
    if link.expires_at <= now:
        raise BadRequest("This connect link has expired; ask for a new one.")
    return link
