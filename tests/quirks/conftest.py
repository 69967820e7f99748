"""Fixtures for the quirk tests: the OAuth layer against a quirky fake authorization server,
the whole gateway (``make_gateway``, re-exported from tests/integration), and an HTTPS fake
upstream for ``upstream_from_token`` (a token response may only move traffic to https).

The HTTPS upstream's certificate comes from a throw-away CA made here; the gateway's client
session trusts it because ``trust_test_ca`` swaps aiohttp's default verifying SSL context
for one that also trusts that CA (restored after the test). Verification stays on: a test
that reached a host the CA did not sign would fail.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.connector
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from yarl import URL

from gateway.config import ProviderConfig
from gateway.oauth.client import OAuthClient
from gateway.oauth.protocol import OAuthError, TokenGrant, authorize_url, new_pkce, new_state
from tests.fakes.authserver import FakeAuthServer
from tests.fakes.upstream import FakeUpstream
from tests.integration.conftest import Clock, Gateway, make_gateway  # noqa: F401 (fixture)

REDIRECT_URI = "http://127.0.0.1:8080/_gateway/callback"
PASSWORD = "correct horse battery"


async def authorize(session: aiohttp.ClientSession, provider: ProviderConfig) -> URL:
    """Follow the authorize request the gateway would send (auto-approving fake); the URL the
    fake redirected back to, with ``code`` or ``error``."""
    verifier, challenge = new_pkce()
    url = authorize_url(provider, redirect_uri=REDIRECT_URI, state=new_state(),
                        code_challenge=challenge)
    async with session.get(url, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        back = URL(resp.headers["Location"])
    return back.update_query(verifier=verifier)


async def exchange(session: aiohttp.ClientSession, oauth: OAuthClient,
                   provider: ProviderConfig, now: float) -> TokenGrant | OAuthError:
    """The whole code flow through the real OAuthClient."""
    back = await authorize(session, provider)
    assert "code" in back.query, back.query.get("error_description")
    return await oauth.exchange_code(provider, code=back.query["code"],
                                     redirect_uri=REDIRECT_URI,
                                     code_verifier=back.query["verifier"], now=now)


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TestCA:
    ca_file: Path
    server: ssl.SSLContext  # for the fake upstream: a certificate for 127.0.0.1

    __test__ = False  # not a test class


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A CA and a 127.0.0.1 server certificate it signed (EC keys: fast to make)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(_name("quirks test CA"))
          .issuer_name(_name("quirks test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return TestCA(ca_file=ca_file, server=server)


@pytest.fixture
def trust_test_ca(test_ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every aiohttp client that verifies certificates (the gateway's) trust the CA."""
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=test_ca.ca_file)
    monkeypatch.setattr(aiohttp.connector, "_SSL_CONTEXT_VERIFIED", ctx)
    yield


@dataclass
class TlsUpstream:
    fake: FakeUpstream
    url: URL  # https://127.0.0.1:PORT


@pytest.fixture
async def tls_upstream(aiohttp_server: Any, test_ca: TestCA, trust_test_ca: None) -> TlsUpstream:
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app(), ssl=test_ca.server)
    return TlsUpstream(fake, URL.build(scheme="https", host="127.0.0.1", port=fake.server.port))


# --------------------------------------------------------------------------- helpers


class ValidTokens(set[str]):
    """``FakeUpstream.accepted_tokens`` that accepts exactly what the fake authorization server
    deems valid right now (so expiring or revoking there makes the upstream answer 401)."""

    def __init__(self, auth: FakeAuthServer) -> None:
        super().__init__()
        self._auth = auth

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and self._auth.is_valid_access_token(token) is not None


async def connected(gw: Gateway, name: str = "alice", provider: str = "fake") -> str:
    """Create ``name``, run the consent flow for ``provider``; the identity's gateway key."""
    key = await gw.identity(name, PASSWORD)
    resp = await gw.connect(name, PASSWORD, provider)
    assert resp.status == 200 and "connected" in await resp.text(), await resp.text()
    return key


async def call(gw: Gateway, key: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
    """A client request through the gateway (the response body already read)."""
    session = gw.client()
    resp = await session.get(URL(f"{gw.url}{path}", encoded=True), allow_redirects=False,
                             headers={"Authorization": f"Bearer {key}"}, **kw)
    await resp.read()
    return resp


def bearer(headers: list[tuple[str, str]]) -> str:
    """The token in the (single) Authorization header an upstream received."""
    values = [v for k, v in headers if k.lower() == "authorization"]
    assert len(values) == 1, values
    scheme, _, token = values[0].partition(" ")
    assert scheme == "Bearer", values[0]
    return token
