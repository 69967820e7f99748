"""Request limits a client cannot push past, each answered with a 4xx rather than a 5xx.

Theory of operation
-------------------
* **Parser limits** (``server.max_url_bytes``, ``server.max_header_bytes``,
  ``server.max_headers``) are enforced by aiohttp's HTTP parser before any handler runs, so
  an oversized request costs the gateway one bounded buffer and never reaches the app.
  :func:`parser_limits` turns them into the keyword arguments of ``web.AppRunner`` (and of the
  test server). The parser answers such a request with a plain ``400 Bad Request`` and closes
  the connection; it has no ``Gateway-Error`` header because no application code ran.
* **Body size** (``server.max_body_bytes``) is the proxy handler's: 413 by ``Content-Length``
  or as soon as a streamed body grows past it.
* **Concurrent requests per identity** (``server.max_concurrent_per_identity``):
  :class:`InFlightLimiter` counts the requests each identity has in flight in this process
  and refuses one more with ``429 rate_limited`` and ``Retry-After`` (RFC 6585 §4). It does
  not queue: a queued request would still hold a socket and a buffer, which is what the
  limit protects. :func:`admit` takes a slot once the identity is known (after
  authentication); :func:`release_slots`, a middleware, gives it back when the request ends
  however it ends (answered, streamed, failed, or cancelled by a client that went away).
* **Pending authorizations per identity** live with the consent flow
  (``gateway.web.consent.MAX_PENDING_PER_IDENTITY``): 429 with Retry-After.

With ``--workers N`` each worker keeps its own counts, so an identity may hold up to N times
the configured number of requests (the kernel spreads connections over the workers).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypedDict

from aiohttp import web

from gateway.config import ServerConfig
from gateway.errors import TooManyRequests

__all__ = ["SLOT", "InFlightLimiter", "ParserLimits", "admit", "parser_limits", "release_slots"]

# The request line is "<METHOD> <target> HTTP/1.1": room for the method and the version, so
# that max_url_bytes bounds the target under both of aiohttp's parsers (the C parser limits
# the target alone, the pure-Python one the whole line).
_REQUEST_LINE_OVERHEAD = 32


class ParserLimits(TypedDict):
    """Keyword arguments of ``web.AppRunner`` / ``web.Server`` (aiohttp's parser limits)."""

    max_line_size: int
    max_field_size: int
    max_headers: int


def parser_limits(server: ServerConfig) -> ParserLimits:
    """``web.AppRunner(app, **parser_limits(config.server))``: the HTTP parser's limits."""
    return {
        "max_line_size": server.max_url_bytes + _REQUEST_LINE_OVERHEAD,
        "max_field_size": server.max_header_bytes,
        "max_headers": server.max_headers,
    }


class InFlightLimiter:
    """In-flight request counts per key (an identity id); see the module docstring."""

    def __init__(self, limit: int, *, retry_after: int = 1) -> None:
        if limit < 0:
            raise ValueError("limit must be 0 (no limit) or more")
        self.limit = limit
        self.retry_after = retry_after
        self._counts: dict[int, int] = {}

    def acquire(self, key: int) -> None:
        """Take a slot for ``key`` or raise TooManyRequests (429, Retry-After)."""
        n = self._counts.get(key, 0)
        if self.limit and n >= self.limit:
            raise TooManyRequests(
                f"Too many requests in flight for this identity (at most {self.limit} at "
                "once); wait for some to finish.", retry_after=self.retry_after)
        self._counts[key] = n + 1

    def release(self, key: int) -> None:
        n = self._counts.get(key, 0) - 1
        if n > 0:
            self._counts[key] = n
        else:
            self._counts.pop(key, None)  # idle identities cost nothing

    def in_flight(self, key: int | None = None) -> int:
        """Requests in flight for ``key`` (for every key when None)."""
        if key is None:
            return sum(self._counts.values())
        return self._counts.get(key, 0)


SLOT: web.RequestKey[tuple[InFlightLimiter, int]] = web.RequestKey("gateway.inflight_slot")


def admit(request: web.Request, limiter: InFlightLimiter | None, key: int) -> None:
    """Take ``key``'s slot for this request (once; later calls are no-ops), raising
    TooManyRequests when it has none left. :func:`release_slots` must be installed."""
    if limiter is None or SLOT in request:
        return
    limiter.acquire(key)
    request[SLOT] = (limiter, key)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def release_slots(request: web.Request, handler: Handler) -> Any:
    """Give back the slot :func:`admit` took, when the request ends in any way."""
    try:
        return await handler(request)
    finally:
        held = request.get(SLOT)
        if held is not None:
            del request[SLOT]
            held[0].release(held[1])
