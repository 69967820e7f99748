"""OpenID Connect id_token verification (OIDC Core §3.1.3.7) against the provider's JWKS.

The id_token arrives over TLS straight from the token endpoint, so it is already
authenticated by transport; verifying it anyway binds it to *this* authorization request
(``nonce``) and *this* client (``aud``), and catches a mis-configured issuer early.

Keys come from the ``jwks_uri`` (RFC 7517 key set), cached per URL for ``ttl`` seconds and
fetched again at most once per verification when the token names a ``kid`` we have not seen
(key rotation), but never more often than ``min_refetch`` seconds, so a stream of unknown
kids cannot turn into a stream of fetches. Only asymmetric algorithms are accepted; ``none``
and HMAC (keyed with the client secret) never are.

Times come from the caller (``now``), not from PyJWT's clock, so tests control them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from jwt.exceptions import (
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)

from gateway.errors import GatewayError

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
              "ES256", "ES384", "ES512", "EdDSA")
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_MAX_JWKS = 512 * 1024


class InvalidIdToken(GatewayError):
    """The id_token failed verification, or the keys to verify it could not be fetched
    (``transient``). The message never contains the token."""

    status, code = 502, "invalid_id_token"

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True, slots=True)
class _KeySet:
    fetched_at: float
    keys: tuple[Mapping[str, Any], ...]


class JwksCache:
    """JWK sets by URL with a TTL; one fetch at a time per URL."""

    def __init__(self, session: aiohttp.ClientSession, *, ttl: float = 3600.0,
                 min_refetch: float = 10.0, timeout: float = 10.0) -> None:
        self._session = session
        self._ttl = ttl
        self._min_refetch = min_refetch
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._sets: dict[str, _KeySet] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0  # for tests and metrics

    async def get(self, url: str, now: float, *,
                  refetch: bool = False) -> tuple[Mapping[str, Any], ...]:
        """The keys at ``url``; ``refetch`` asks for a fresh copy (unknown kid)."""
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            cached = self._sets.get(url)
            age = None if cached is None else now - cached.fetched_at
            if cached is not None and age is not None and age < self._ttl and not (
                    refetch and age >= self._min_refetch):
                return cached.keys
            keys = await self._fetch(url)
            self._sets[url] = _KeySet(now, keys)
            return keys

    async def _fetch(self, url: str) -> tuple[Mapping[str, Any], ...]:
        self.fetches += 1
        try:
            async with self._session.get(url, timeout=self._timeout,
                                         headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise InvalidIdToken(f"JWKS fetch answered HTTP {resp.status}",
                                         transient=True)
                raw = await resp.content.read(_MAX_JWKS + 1)
        except TimeoutError:
            raise InvalidIdToken("JWKS fetch timed out", transient=True) from None
        except aiohttp.ClientError as e:
            raise InvalidIdToken(f"JWKS unreachable ({type(e).__name__})",
                                 transient=True) from None
        if len(raw) > _MAX_JWKS:
            raise InvalidIdToken("JWKS document is too large", transient=True)
        try:
            data = json.loads(raw)
        except ValueError:
            raise InvalidIdToken("JWKS document is not JSON", transient=True) from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list):
            raise InvalidIdToken("JWKS document has no keys", transient=True)
        return tuple(k for k in keys if isinstance(k, dict))


def _candidates(keys: Sequence[Mapping[str, Any]], kid: str | None,
                alg: str) -> list[Mapping[str, Any]]:
    """Signing keys that could have made a signature with ``alg`` (RFC 7517 §4)."""
    kty = _KTY[alg[:2]]
    out = []
    for k in keys:
        if k.get("kty") != kty or k.get("use", "sig") != "sig":
            continue
        if k.get("alg") not in (None, alg):
            continue
        if kid is not None and k.get("kid") != kid:
            continue
        out.append(k)
    return out


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidIdToken(f"id_token claim {name} is not a number")
    return float(v)


class IdTokenVerifier:
    """Verifies id_tokens: signature, ``iss``, ``aud``/``azp``, ``exp``/``iat``/``nbf``,
    ``nonce``."""

    def __init__(self, session: aiohttp.ClientSession, *, ttl: float = 3600.0,
                 leeway: float = 60.0, timeout: float = 10.0,
                 min_refetch: float = 10.0, algorithms: Sequence[str] = ALGORITHMS) -> None:
        self.jwks = JwksCache(session, ttl=ttl, min_refetch=min_refetch, timeout=timeout)
        self._leeway = leeway
        self._algorithms = tuple(a for a in algorithms if a in ALGORITHMS)

    async def verify(self, id_token: str, *, jwks_url: str, issuer: str, client_id: str,
                     nonce: str | None, now: float) -> dict[str, Any]:
        """The verified claims; raises :class:`InvalidIdToken`."""
        try:
            header = jwt.get_unverified_header(id_token)
        except PyJWTError:
            raise InvalidIdToken("id_token is not a signed JWT") from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise InvalidIdToken(f"id_token algorithm {str(alg)[:20]!r} is not accepted")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None

        keys = _candidates(await self.jwks.get(jwks_url, now), kid, alg)
        if not keys and kid is not None:  # the provider may have rotated its keys
            keys = _candidates(await self.jwks.get(jwks_url, now, refetch=True), kid, alg)
        if not keys:
            raise InvalidIdToken("no key in the provider's JWKS matches the id_token")

        claims = self._decode(id_token, keys, alg, issuer=issuer, client_id=client_id)
        self._check_times(claims, now)
        aud = claims.get("aud")
        azp = claims.get("azp")
        # OIDC Core §3.1.3.7 items 4-5: with several audiences, azp must name us.
        if (azp is not None or (isinstance(aud, list) and len(aud) > 1)) and azp != client_id:
            raise InvalidIdToken("id_token azp is not this client")
        if nonce is not None:
            got = claims.get("nonce")
            if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
                raise InvalidIdToken("id_token nonce does not match the authorization request")
        return claims

    def _decode(self, token: str, keys: Sequence[Mapping[str, Any]], alg: str, *,
                issuer: str, client_id: str) -> dict[str, Any]:
        for jwk in keys:
            try:
                key = jwt.PyJWK(dict(jwk), algorithm=alg)
            except PyJWTError:
                continue  # a key we cannot load cannot have signed it
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key=key.key, algorithms=[alg], audience=client_id, issuer=issuer,
                    options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                             "require": ["iss", "sub", "aud", "exp", "iat"]})
            except InvalidSignatureError:
                continue
            except InvalidAudienceError:
                raise InvalidIdToken("id_token audience is not this client") from None
            except InvalidIssuerError:
                raise InvalidIdToken("id_token issuer does not match the provider") from None
            except MissingRequiredClaimError as e:
                raise InvalidIdToken(f"id_token lacks the {e.claim} claim") from None
            except PyJWTError as e:
                raise InvalidIdToken(f"id_token is malformed ({type(e).__name__})") from None
            return claims
        raise InvalidIdToken("id_token signature is invalid")

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        exp, iat, nbf = (_number(claims, n) for n in ("exp", "iat", "nbf"))
        if exp is None or iat is None:
            raise InvalidIdToken("id_token lacks exp or iat")
        if now > exp + self._leeway:
            raise InvalidIdToken("id_token has expired")
        if iat > now + self._leeway:
            raise InvalidIdToken("id_token was issued in the future")
        if nbf is not None and nbf > now + self._leeway:
            raise InvalidIdToken("id_token is not valid yet")
