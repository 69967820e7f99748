"""Per-identity rate limiting: one token bucket per identity, in this process.

A bucket holds at most ``burst`` tokens and refills at ``requests_per_second``; every
request takes one. An empty bucket answers ``429 rate_limited`` with ``Retry-After`` set to
the whole seconds until a token is back. The arithmetic is a pure function over an injected
monotonic clock, so it is tested without waiting.

Buckets live in process memory: with ``--workers N`` each worker keeps its own, so an
identity may reach N times the configured rate (the kernel spreads connections over the
workers). Idle buckets are full and carry no information, so they are dropped first when
the table grows past ``max_keys``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import TooManyRequests


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``requests_per_second`` sustained, up to ``burst`` at once."""

    requests_per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.requests_per_second > 0 and math.isfinite(self.requests_per_second)):
            raise ValueError("requests_per_second must be a positive number")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    updated: float


def take(bucket: Bucket | None, limit: RateLimit, now: float) -> tuple[Bucket, float]:
    """Take one token: (the bucket afterwards, seconds to wait; 0 means allowed).

    A refused request takes nothing, so hammering an empty bucket does not push the next
    allowed request further away.
    """
    if bucket is None:
        tokens = float(limit.burst)
    else:
        elapsed = max(0.0, now - bucket.updated)  # a clock that stepped back refills nothing
        tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.requests_per_second)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), 0.0
    return Bucket(tokens, now), (1.0 - tokens) / limit.requests_per_second


class RateLimiter:
    """Token buckets keyed by identity id."""

    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.limit = limit
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[int, Bucket] = OrderedDict()

    def wait_time(self, key: int) -> float:
        """Take a token for ``key``; seconds until one is available (0: go ahead)."""
        now = self._clock()
        bucket, wait = take(self._buckets.get(key), self.limit, now)
        self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        if len(self._buckets) > self._max_keys:
            self._prune(now)
        return wait

    def check(self, key: int) -> None:
        """Raise TooManyRequests (429, with Retry-After) when ``key`` is over its rate."""
        wait = self.wait_time(key)
        if wait > 0:
            raise TooManyRequests(
                f"Rate limit exceeded: at most {self.limit.requests_per_second:g} requests "
                f"per second (bursts of {self.limit.burst}) per identity.",
                retry_after=math.ceil(wait))

    def _prune(self, now: float) -> None:
        """Drop buckets that have refilled completely, then the least recently used."""
        full = [k for k, b in self._buckets.items()
                if b.tokens + (now - b.updated) * self.limit.requests_per_second
                >= self.limit.burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
