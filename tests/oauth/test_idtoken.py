"""id_token verification against the fake server's JWKS."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from gateway.oauth.client import OAuthClient
from gateway.oauth.idtoken import IdTokenVerifier, InvalidIdToken
from gateway.oauth.protocol import TokenGrant, new_nonce
from tests.fakes.authserver import DEFAULT_CLIENT_ID, FakeAuthServer
from tests.oauth.conftest import REDIRECT_URI, GetCode

NOW = float(int(time.time()))


@pytest.fixture
def verifier(session: aiohttp.ClientSession) -> IdTokenVerifier:
    return IdTokenVerifier(session, ttl=300, leeway=30, min_refetch=10)


def claims(fake: FakeAuthServer, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": fake.issuer_url(), "sub": "alice", "aud": DEFAULT_CLIENT_ID,
                            "iat": int(NOW), "exp": int(NOW) + 600, "nonce": "n0"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


async def check(verifier: IdTokenVerifier, fake: FakeAuthServer, token: str, *,
                nonce: str | None = "n0", now: float = NOW) -> dict[str, Any]:
    return await verifier.verify(token, jwks_url=str(fake.url / "jwks"), issuer=fake.issuer_url(),
                                 client_id=DEFAULT_CLIENT_ID, nonce=nonce, now=now)


async def test_id_token_from_the_code_flow_verifies(fake: FakeAuthServer, oauth: OAuthClient,
                                                    get_code: GetCode,
                                                    verifier: IdTokenVerifier) -> None:
    provider = fake.provider_config(scopes=("openid", "profile"))
    nonce = new_nonce()
    code, code_verifier = await get_code(provider, nonce=nonce)
    grant = await oauth.exchange_code(provider, code=code, redirect_uri=REDIRECT_URI,
                                      code_verifier=code_verifier, now=NOW)
    assert isinstance(grant, TokenGrant) and grant.id_token
    got = await check(verifier, fake, grant.id_token, nonce=nonce, now=time.time())
    assert got["sub"] == "alice" and got["nonce"] == nonce
    await check(verifier, fake, grant.id_token, nonce=nonce, now=time.time())
    assert fake.hits["jwks"] == 1  # cached


@pytest.mark.parametrize(("kw", "now", "nonce", "message"), [
    ({"aud": "someone-else"}, NOW, "n0", "audience"),
    ({"aud": ["someone-else", DEFAULT_CLIENT_ID]}, NOW, "n0", "azp"),
    ({"azp": "someone-else"}, NOW, "n0", "azp"),
    ({"iss": "https://evil.example"}, NOW, "n0", "issuer"),
    ({}, NOW, "other-nonce", "nonce"),
    ({"nonce": None}, NOW, "n0", "nonce"),
    ({}, NOW + 600 + 31, "n0", "expired"),
    ({"iat": int(NOW) + 120}, NOW, "n0", "future"),
    ({"nbf": int(NOW) + 120}, NOW, "n0", "not valid yet"),
    ({"sub": None}, NOW, "n0", "sub"),
    ({"exp": None}, NOW, "n0", "exp"),
    ({"exp": "tomorrow"}, NOW, "n0", "number"),
])
async def test_claim_checks(fake: FakeAuthServer, verifier: IdTokenVerifier, kw: dict[str, Any],
                            now: float, nonce: str, message: str) -> None:
    token = fake.sign_id_token(claims(fake, **kw))
    with pytest.raises(InvalidIdToken, match=message) as info:
        await check(verifier, fake, token, nonce=nonce, now=now)
    assert token not in str(info.value) and not info.value.transient
    assert (info.value.status, info.value.code) == (502, "invalid_id_token")


async def test_accepted_edge_cases(fake: FakeAuthServer, verifier: IdTokenVerifier) -> None:
    # within leeway; several audiences with azp naming us; no nonce expected
    token = fake.sign_id_token(claims(fake, aud=[DEFAULT_CLIENT_ID, "x"], azp=DEFAULT_CLIENT_ID))
    assert (await check(verifier, fake, token, now=NOW + 600 + 29))["sub"] == "alice"
    token = fake.sign_id_token(claims(fake, nonce=None))
    assert (await check(verifier, fake, token, nonce=None))["sub"] == "alice"


async def test_bad_signature(fake: FakeAuthServer, verifier: IdTokenVerifier) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = fake.sign_id_token(claims(fake), key=other)  # right kid, wrong key
    with pytest.raises(InvalidIdToken, match="signature"):
        await check(verifier, fake, token)
    good = fake.sign_id_token(claims(fake))
    head, _, sig = good.split(".")
    tampered = fake.sign_id_token(claims(fake, sub="mallory")).split(".")[1]
    with pytest.raises(InvalidIdToken, match="signature"):
        await check(verifier, fake, f"{head}.{tampered}.{sig}")


@pytest.mark.parametrize("kind", ["none", "hs256", "garbage", "ps_with_rs_key"])
async def test_rejected_algorithms_and_garbage(fake: FakeAuthServer, verifier: IdTokenVerifier,
                                               kind: str) -> None:
    c = claims(fake)
    if kind == "none":
        token = jwt.encode(c, "", algorithm="none")
    elif kind == "hs256":
        token = jwt.encode(c, "s3cret-" * 6, algorithm="HS256", headers={"kid": "k1"})
    elif kind == "garbage":
        token = "not-a.jwt"
    else:  # the JWK says alg RS256: a PS256 header must not pick it
        token = jwt.encode(c, fake._keys[0][1], algorithm="PS256", headers={"kid": "k1"})
    with pytest.raises(InvalidIdToken):
        await check(verifier, fake, token)


async def test_unknown_kid_refetches_once(fake: FakeAuthServer,
                                          verifier: IdTokenVerifier) -> None:
    await check(verifier, fake, fake.sign_id_token(claims(fake)))
    assert fake.hits["jwks"] == 1
    with pytest.raises(InvalidIdToken, match="no key"):
        await check(verifier, fake, fake.sign_id_token(claims(fake), kid="nope"), now=NOW + 20)
    assert fake.hits["jwks"] == 2
    # a second unknown kid right away does not trigger another fetch (min_refetch)
    with pytest.raises(InvalidIdToken, match="no key"):
        await check(verifier, fake, fake.sign_id_token(claims(fake), kid="nope2"), now=NOW + 21)
    assert fake.hits["jwks"] == 2


async def test_key_rotation_and_ttl(fake: FakeAuthServer, verifier: IdTokenVerifier) -> None:
    await check(verifier, fake, fake.sign_id_token(claims(fake)))
    fake.rotate_signing_key()
    rotated = fake.sign_id_token(claims(fake))
    assert (await check(verifier, fake, rotated, now=NOW + 15))["sub"] == "alice"
    assert fake.hits["jwks"] == 2
    await check(verifier, fake, rotated, now=NOW + 16)
    assert fake.hits["jwks"] == 2
    await check(verifier, fake, rotated, now=NOW + 15 + 301)  # ttl elapsed
    assert fake.hits["jwks"] == 3


async def test_es256_with_a_foreign_jwks(aiohttp_server: Any, session: aiohttp.ClientSession,
                                         verifier: IdTokenVerifier) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "ec1"}
    app = web.Application()

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [{"kty": "oct", "k": "AAAA"}, jwk]})

    app.router.add_get("/jwks", jwks)
    server = await aiohttp_server(app)
    c = {"iss": "https://op.example", "sub": "s", "aud": "cid", "iat": NOW, "exp": NOW + 60}
    token = jwt.encode(c, key, algorithm="ES256", headers={"kid": "ec1"})
    got = await verifier.verify(token, jwks_url=str(server.make_url("/jwks")),
                                issuer="https://op.example", client_id="cid", nonce=None, now=NOW)
    assert got["sub"] == "s"


async def test_jwks_unreachable_is_transient(verifier: IdTokenVerifier, unused_tcp_port: int,
                                             fake: FakeAuthServer) -> None:
    token = fake.sign_id_token(claims(fake))
    with pytest.raises(InvalidIdToken) as info:
        await verifier.verify(token, jwks_url=f"http://127.0.0.1:{unused_tcp_port}/jwks",
                              issuer=fake.issuer_url(), client_id=DEFAULT_CLIENT_ID, nonce="n0",
                              now=NOW)
    assert info.value.transient
