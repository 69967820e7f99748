"""What the proxy needs from the token layer, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from yarl import URL

from gateway.store.base import Identity


@dataclass(frozen=True, slots=True)
class Lease:
    """An access token the proxy may use now, with the connection version it came from."""

    access_token: str = field(repr=False)
    token_type: str = "Bearer"  # noqa: S105 (a scheme name)
    version: int = 0
    upstream: URL | None = None  # set when the token response chose the API base (instance_url)


class TokenSource(Protocol):
    async def lease(self, identity: Identity, provider: str) -> Lease:
        """A usable token; raises ConsentRequired, ReconsentRequired or
        TokenEndpointUnavailable."""

    async def rejected(self, identity: Identity, provider: str, lease: Lease) -> Lease | None:
        """The upstream answered 401 to ``lease``: refresh once (single-flight) and return the
        new lease, or None when no better token can be had."""
