"""Fixtures running panva's oidc-provider; see :mod:`tests.thirdparty.oidc`.

- ``oidc_provider``: one server for the whole session, with :func:`default_clients`
  (``gw-basic``, ``gw-post``, ``gw-public``, ``gw-service``) redirecting to ``REDIRECT_URI``.
- ``oidc_provider_factory``: ``start(clients=None, *, redirect_uri=..., access_token_ttl=300,
  refresh_token_ttl=86400, rotate_refresh=True) -> OidcProvider``, a server of your own,
  stopped when the test ends.

Without ``tests/thirdparty/node_modules`` (or ``node``) these skip; with ``CI`` set they fail,
so a CI that forgot ``npm ci --prefix tests/thirdparty`` cannot pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.thirdparty.oidc import (
    REDIRECT_URI,
    OidcProvider,
    OidcUnavailable,
    check_installed,
    start_oidc_provider,
)


def _require_installed() -> None:
    try:
        check_installed()
    except OidcUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (CI is set, so this is an error, not a skip)", pytrace=False)
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    _require_installed()
    with start_oidc_provider(tmp_path_factory.mktemp("oidc"), redirect_uri=REDIRECT_URI) as p:
        yield p


@pytest.fixture
def oidc_provider_factory(tmp_path: Path) -> Iterator[Callable[..., OidcProvider]]:
    _require_installed()
    with ExitStack() as stack:

        def start(*args: Any, **kwargs: Any) -> OidcProvider:
            return stack.enter_context(start_oidc_provider(tmp_path / "oidc", *args, **kwargs))

        yield start
