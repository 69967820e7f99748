"""Header policy for both directions of the proxy, as pure functions over header lists.

Request (client to upstream):

* hop-by-hop headers (RFC 9110 §7.6.1, plus the older ``Keep-Alive``/``Proxy-*`` names) and
  every header named in ``Connection`` are dropped: they describe the client's connection;
* ``Host`` is dropped (the client library sets the upstream's), so is ``Expect`` (the
  gateway's own server already answered ``100 Continue``);
* the client's ``Authorization`` and ``Proxy-Authorization`` are dropped: they carry the
  gateway key, which never reaches an upstream; the lease's token goes in their place;
* the gateway's own cookies (``gateway_*``) are cut out of ``Cookie``; other cookies stay;
* ``X-Forwarded-For`` gets the client address appended; ``-Proto`` and ``-Host`` are set.

``Content-Length`` is kept so a sized body stays sized upstream; ``Transfer-Encoding`` is
hop-by-hop, so an unsized body is re-chunked by the client library.

Response (upstream to client): hop-by-hop and ``Connection``-named headers are dropped,
``Location``/``Content-Location`` are rewritten by the caller's function, and a
``Set-Cookie`` for a gateway cookie is dropped so an upstream cannot fixate a gateway
session. Everything else (``Content-Encoding`` included) passes untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from multidict import CIMultiDict, MultiMapping

__all__ = [
    "GATEWAY_COOKIE_PREFIX",
    "HOP_BY_HOP",
    "Forwarded",
    "authorization_value",
    "request_headers",
    "response_headers",
    "strip_gateway_cookies",
]

HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
})
GATEWAY_COOKIE_PREFIX = "gateway_"
_REQUEST_DROP = frozenset({"host", "authorization", "expect"})
# A WebSocket handshake is rebuilt per hop by the client library; only the subprotocol
# offer is carried over, as an argument rather than a header.
_WEBSOCKET_DROP = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-accept", "sec-websocket-protocol",
})


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What the ``X-Forwarded-*`` headers say about the client's request."""

    client: str | None  # peer address
    proto: str  # "http" | "https"
    host: str | None  # the Host the client asked for


def connection_named(headers: MultiMapping[str]) -> frozenset[str]:
    """Lower-cased header names listed in every ``Connection`` header (RFC 9110 §7.6.1)."""
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(names)


def authorization_value(token_type: str, token: str, scheme: str = "Bearer") -> str:
    """``<scheme> <token>`` for a bearer token: RFC 6750 §2.1 says ``Bearer``, but a few APIs
    want another scheme for the same token (the provider's ``upstream_auth_scheme``;
    SoundCloud: ``OAuth``). A lower-case ``bearer`` token type (common) counts as bearer; any
    other token type names its own scheme."""
    if token_type.lower() == "bearer" or not token_type:
        return f"{scheme or 'Bearer'} {token}"
    return f"{token_type} {token}"


def strip_gateway_cookies(value: str) -> str | None:
    """``Cookie`` without the gateway's own cookies; None if nothing is left."""
    pieces = [p.strip() for p in value.split(";")]
    kept = [p for p in pieces
            if p and not p.split("=", 1)[0].strip().startswith(GATEWAY_COOKIE_PREFIX)]
    if len(kept) == len([p for p in pieces if p]):
        return value  # nothing removed: forward the header byte for byte
    return "; ".join(kept) or None


def request_headers(headers: MultiMapping[str], *, authorization: str | None,
                    forwarded: Forwarded | None, websocket: bool = False) -> CIMultiDict[str]:
    """The headers to send upstream for a client request with ``headers``."""
    drop = HOP_BY_HOP | _REQUEST_DROP | connection_named(headers)
    if websocket:
        drop |= _WEBSOCKET_DROP
    if forwarded is not None:
        drop |= {"x-forwarded-proto", "x-forwarded-host"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in drop:
            continue
        if lname == "cookie":
            stripped = strip_gateway_cookies(value)
            if stripped is not None:
                out.add(name, stripped)
            continue
        out.add(name, value)
    if authorization is not None:
        out["Authorization"] = authorization
    if forwarded is not None:
        _add_forwarded(out, forwarded)
    return out


def _add_forwarded(out: CIMultiDict[str], fwd: Forwarded) -> None:
    prior = [v.strip() for v in out.popall("X-Forwarded-For", ()) if v.strip()]
    chain = [*prior, fwd.client] if fwd.client else prior
    if chain:
        out["X-Forwarded-For"] = ", ".join(chain)
    out["X-Forwarded-Proto"] = fwd.proto
    if fwd.host:
        out["X-Forwarded-Host"] = fwd.host


def response_headers(headers: MultiMapping[str],
                     rewrite: Callable[[str], str] | None = None) -> CIMultiDict[str]:
    """The upstream response headers to send to the client."""
    drop = HOP_BY_HOP | connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in drop:
            continue
        if lname == "set-cookie" and value.split("=", 1)[0].strip().startswith(
                GATEWAY_COOKIE_PREFIX):
            continue
        if rewrite is not None and lname in ("location", "content-location"):
            value = rewrite(value)
        out.add(name, value)
    return out
