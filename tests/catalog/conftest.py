"""Fixtures for the catalog and discovery tests.

``oidc_provider`` (panva's oidc-provider, a certified OpenID Provider, run as a subprocess)
is re-exported from tests/thirdparty; it skips when node_modules is missing (fails under CI).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from gateway.oauth import discovery
from tests.thirdparty.conftest import oidc_provider  # noqa: F401  (fixture re-export)


@pytest.fixture(autouse=True)
def _fresh_discovery_cache() -> Iterator[None]:
    """Each test starts and ends with an empty process-wide discovery cache."""
    discovery.clear_cache()
    yield
    discovery.clear_cache()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port with a bound but non-listening socket: connecting is refused, reliably."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()
