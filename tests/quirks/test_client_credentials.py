"""The client_credentials grant through the whole gateway: no consent step, one token owned
by the gateway and shared by the identities allowed to use it, fetched and renewed with the
same single-flight and failure rules as user tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.tokens.manager import GATEWAY_IDENTITY
from tests.quirks.conftest import Gateway, ValidTokens, bearer, call

MACHINE = {"grant": "client_credentials", "scopes": ["api"]}


async def test_one_shared_token_fetched_once_for_concurrent_callers(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(provider=MACHINE)
    keys = [await gw.identity("alice"), await gw.identity("bob")]
    gw.auth.hold_tokens()
    calls = [asyncio.create_task(call(gw, keys[i % 2], f"/fake/jobs/{i}")) for i in range(8)]
    await gw.auth.wait_for_hits("token", 1)
    gw.auth.release_tokens()
    assert [r.status for r in await asyncio.gather(*calls)] == [200] * 8
    assert gw.auth.hits["token"] == 1 and gw.auth.grants["client_credentials"] == 1
    tokens = {bearer(r.headers) for r in gw.upstream.requests}
    assert len(tokens) == 1
    assert gw.auth.is_valid_access_token(tokens.pop()) == gw.config.providers["fake"].client_id
    # The connection is the gateway's, not the callers'.
    store = gw.services.store
    owner = await store.get_identity(GATEWAY_IDENTITY)
    assert owner is not None
    [conn] = await store.list_connections()
    assert (conn.identity_id, conn.provider, conn.tokens.scopes) == (owner.id, "fake", ("api",))
    assert gw.auth.hits["authorize"] == 0


async def test_renewed_when_due_and_after_an_upstream_401(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(provider=MACHINE)
    gw.upstream.accepted_tokens = ValidTokens(gw.auth)
    key = await gw.identity("alice")
    assert (await call(gw, key, "/fake/protected")).status == 200
    gw.clock.advance(3600)  # expired by the gateway's clock: fetched again, no refresh token
    assert (await call(gw, key, "/fake/protected")).status == 200
    assert gw.auth.grants == {"client_credentials": 2}
    gw.auth.expire_access_tokens()  # rejected upstream: exactly one more fetch, then a retry
    r = await call(gw, key, "/fake/protected")
    assert r.status == 200 and gw.auth.grants == {"client_credentials": 3}
    assert [x.raw_path for x in gw.upstream.requests][-2:] == ["/api/protected"] * 2


async def test_token_endpoint_failure_is_a_503_and_recovers(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(provider=MACHINE)
    key = await gw.identity("alice")
    gw.auth.fail_next(1, 503, headers={"Retry-After": "7"})
    r = await call(gw, key, "/fake/x")
    assert r.status == 503 and r.headers["Gateway-Error"] == "token_endpoint_unavailable"
    assert r.headers["Retry-After"] == "7" and gw.upstream.requests == []
    gw.auth.fail_next(1, 401, '{"error":"invalid_client"}')  # never consent for a machine
    r = await call(gw, key, "/fake/x")
    assert r.status == 503 and r.headers["Gateway-Error"] == "token_endpoint_unavailable"
    assert (await call(gw, key, "/fake/x")).status == 200
    assert await gw.services.store.list_connections() != []


async def test_only_the_listed_identities_may_use_it(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(provider={**MACHINE, "identities": ["alice"]})
    alice, bob = await gw.identity("alice"), await gw.identity("bob")
    r = await call(gw, bob, "/fake/x")
    assert r.status == 403 and r.headers["Gateway-Error"] == "provider_forbidden"
    assert gw.auth.hits["token"] == 0 and gw.upstream.requests == []
    assert (await call(gw, alice, "/fake/x")).status == 200
    r = await call(gw, bob, "/fake/x")  # the token exists now; still not bob's to use
    assert r.status == 403 and len(gw.upstream.requests) == 1


@pytest.mark.parametrize(("entry", "path"), [
    ({"identities": ["alice"]}, "providers.p.identities"),  # authorization_code
    ({**MACHINE, "identities": []}, "providers.p.identities"),
    ({**MACHINE, "identities": ["ok", "_gateway"]}, "providers.p.identities[1]"),
    ({**MACHINE, "identities": "alice bad/name"}, "providers.p.identities[1]"),
    ({**MACHINE, "identities": {"a": 1}}, "providers.p.identities"),
])
def test_identities_config_errors(write_config: Callable[..., Config],
                                  entry: dict[str, Any], path: str) -> None:
    base = {"token_url": "https://as.example/token", "upstream": "https://api.example",
            "client_id": "c", "client_secret": "s"}
    with pytest.raises(ConfigError) as err:
        write_config({"providers": {"p": {**base, **entry}}})
    assert err.value.path == path


def test_identities_config(write_config: Callable[..., Config]) -> None:
    base = {"token_url": "https://as.example/token", "upstream": "https://api.example",
            "client_id": "c", "client_secret": "s", **MACHINE}
    cfg = write_config({"providers": {"p": {**base, "identities": ["bob", "alice", "bob"]},
                                      "q": base}})
    assert cfg.providers["p"].identities == ("bob", "alice")
    assert cfg.providers["q"].identities is None and cfg.providers["q"].usable
