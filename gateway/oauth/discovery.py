"""Authorization server metadata: OpenID Connect Discovery 1.0, then RFC 8414.

Theory of operation. A provider configured with ``issuer:`` may leave its endpoints out; at
start the gateway fetches the issuer's metadata and fills what is missing (explicit keys
always win). Two well-known locations are tried in turn:

1. ``<issuer>/.well-known/openid-configuration`` (OIDC Discovery §4.1: the suffix is
   appended to the issuer, after removing a terminating ``/``);
2. ``<scheme>://<host>/.well-known/oauth-authorization-server<issuer path>`` (RFC 8414 §3.1:
   the suffix is inserted between host and path).

A document is only used when its ``issuer`` is identical to the configured one (RFC 8414
§3.3, OIDC Discovery §4.3): that is what stops one issuer from speaking for another. Endpoint
URLs must be absolute; an https issuer cannot hand out plain-http endpoints.

A provider whose discovery fails stays in the config, marked not usable with a reason that
names it, so one unreachable identity provider never stops the gateway. Successful results
are cached in memory per issuer, so providers sharing an issuer cost one fetch.

The fetching half (:func:`discover`) is thin; parsing and applying metadata are pure
functions (:func:`parse_metadata`, :func:`apply_metadata`), tested without a network.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from yarl import URL

from gateway.config import ProviderConfig, with_problems
from gateway.errors import ConfigError, GatewayError

MAX_DOCUMENT = 512 * 1024  # metadata documents are a few KiB
OIDC_SUFFIX = "/.well-known/openid-configuration"
RFC8414_SUFFIX = "/.well-known/oauth-authorization-server"
_ENDPOINTS = (  # metadata member -> ProviderConfig field it fills
    ("authorization_endpoint", "authorize_url"),
    ("token_endpoint", "token_url"),
    ("revocation_endpoint", "revocation_url"),
    ("jwks_uri", "jwks_url"),
)

_CACHE: dict[str, Metadata] = {}
log = logging.getLogger("gateway.discovery")


class DiscoveryError(GatewayError):
    """The issuer's metadata could not be fetched or was not acceptable.

    ``reason`` says what went wrong without naming the provider; ``message`` names it.
    """

    status, code = 502, "discovery_failed"

    def __init__(self, reason: str, *, issuer: str, provider: str | None = None) -> None:
        who = f"providers.{provider}.issuer" if provider else "issuer"
        super().__init__(f"{who} ({issuer}): discovery failed: {reason}")
        self.reason = reason
        self.issuer = issuer
        self.provider = provider


@dataclass(frozen=True, slots=True)
class Metadata:
    """The parts of an authorization server's metadata (RFC 8414 §2) the gateway uses.

    A ``*_supported`` member is ``None`` when the document omits it, which is not the same
    as an empty list.
    """

    issuer: str
    authorization_endpoint: URL | None = None
    token_endpoint: URL | None = None
    revocation_endpoint: URL | None = None
    jwks_uri: URL | None = None
    code_challenge_methods_supported: tuple[str, ...] | None = None
    token_endpoint_auth_methods_supported: tuple[str, ...] | None = None
    scopes_supported: tuple[str, ...] | None = None
    source: str = ""  # the URL of the document


# --------------------------------------------------------------------------- pure parts


def well_known_urls(issuer: URL) -> tuple[URL, URL]:
    """``(OIDC Discovery URL, RFC 8414 URL)`` for an issuer."""
    path = issuer.raw_path.rstrip("/")
    origin = issuer.origin()
    oidc = URL(f"{origin}{path}{OIDC_SUFFIX}", encoded=True)
    rfc8414 = URL(f"{origin}{RFC8414_SUFFIX}{path}", encoded=True)
    return oidc, rfc8414


def parse_metadata(body: bytes, *, issuer: str, source: str) -> Metadata:
    """Check one metadata document; raises ``ValueError`` saying what is wrong with it."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the document is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("the document is not a JSON object")
    if doc.get("issuer") != issuer:
        raise ValueError(f"the document's issuer {_clip(doc.get('issuer'))} is not "
                         f"{issuer!r} (they must be identical, RFC 8414 §3.3)")
    secure = URL(issuer).scheme == "https"
    endpoints: dict[str, URL | None] = {}
    for member, _ in _ENDPOINTS:
        endpoints[member] = _endpoint(doc.get(member), member, secure)
    return Metadata(
        issuer=issuer,
        code_challenge_methods_supported=_names(doc, "code_challenge_methods_supported"),
        token_endpoint_auth_methods_supported=_names(doc,
                                                     "token_endpoint_auth_methods_supported"),
        scopes_supported=_names(doc, "scopes_supported"),
        source=source,
        **endpoints,
    )


def _endpoint(value: Any, member: str, secure: bool) -> URL | None:
    if value is None:
        return None
    from gateway.config import parse_http_url

    if not isinstance(value, str):
        raise ValueError(f"{member} is not a string")
    try:
        url = parse_http_url(value, member)
    except ConfigError:
        raise ValueError(f"{member} is not an absolute http(s) URL") from None
    if secure and url.scheme != "https":
        raise ValueError(f"{member} is not an https URL")
    return url


def _names(doc: Mapping[str, Any], member: str) -> tuple[str, ...] | None:
    value = doc.get(member)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{member} is not a list of strings")
    return tuple(value)


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def needs_discovery(provider: ProviderConfig) -> bool:
    """An issuer is set and some endpoint it could supply is not configured."""
    if provider.issuer is None or provider.discovered:
        return False
    return any(getattr(provider, attr) is None for _, attr in _ENDPOINTS
               if attr != "authorize_url" or provider.grant == "authorization_code")


def apply_metadata(provider: ProviderConfig, meta: Metadata) -> ProviderConfig:
    """Fill the endpoints the provider lacks; configured values (config or preset) win.

    PKCE stays on unless the document lists ``code_challenge_methods_supported`` without
    S256 and the provider did not set ``pkce`` itself (RFC 7636 §4.2, RFC 8414 §2). The
    client authentication method moves from the default ``client_secret_basic`` to
    ``client_secret_post`` only when the document says the server takes post but not basic.
    """
    changes: dict[str, Any] = {}
    sources = dict(provider.sources)
    for member, attr in _ENDPOINTS:
        found = getattr(meta, member)
        if getattr(provider, attr) is None and found is not None:
            changes[attr] = found
            sources[attr] = "discovery"
    methods = meta.code_challenge_methods_supported
    if (provider.pkce and "pkce" not in sources and methods is not None
            and "S256" not in methods):
        changes["pkce"] = False
        sources["pkce"] = "discovery"
    auth = meta.token_endpoint_auth_methods_supported
    if ("client_auth" not in sources and auth is not None
            and provider.client_auth == "client_secret_basic"
            and "client_secret_basic" not in auth and "client_secret_post" in auth):
        changes["client_auth"] = "client_secret_post"
        sources["client_auth"] = "discovery"
    return with_problems(replace(provider, **changes, sources=sources, discovered=True,
                                 discovery_error=None))


def mark_failed(provider: ProviderConfig, error: DiscoveryError) -> ProviderConfig:
    """The provider, not usable, with the failure as its reason."""
    problem = f"discovery from {error.issuer} failed: {error.reason}"
    return with_problems(replace(provider, discovered=True, discovery_error=problem))


# --------------------------------------------------------------------------- I/O


# ``timeout`` parameters (ASYNC109) bound each HTTP request through aiohttp's ClientTimeout,
# which also covers connecting and reading the body; a caller's asyncio.timeout still works.
async def discover(session: aiohttp.ClientSession, issuer: URL, *,
                   timeout: float = 10.0,  # noqa: ASYNC109
                   provider: str | None = None) -> Metadata:
    """Fetch and check the issuer's metadata: OIDC Discovery first, then RFC 8414.

    ``timeout`` bounds each fetch. A connection failure or timeout on the first location is
    not retried on the second (same host). Raises :class:`DiscoveryError` naming
    ``provider``; only cancellation propagates otherwise.
    """
    expected = str(issuer)
    failures: list[str] = []
    for url in well_known_urls(issuer):
        try:
            body = await _fetch(session, url, timeout)
        except _Unreachable as e:
            failures.append(f"{url} {e}")
            break
        except ValueError as e:
            failures.append(f"{url} {e}")
            continue
        try:
            return parse_metadata(body, issuer=expected, source=str(url))
        except ValueError as e:
            failures.append(f"{url}: {e}")
    raise DiscoveryError("; ".join(failures), issuer=expected, provider=provider)


class _Unreachable(Exception):
    """No HTTP answer at all (connection refused, DNS, TLS, timeout)."""


async def _fetch(session: aiohttp.ClientSession, url: URL,
                 timeout: float) -> bytes:  # noqa: ASYNC109
    try:
        async with session.get(url, headers={"Accept": "application/json"},
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:  # RFC 8414 §3.2: a 200 OK carries the document
                raise ValueError(f"answered HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > MAX_DOCUMENT:
                    raise ValueError("answered with a document over 512 KiB")
            return bytes(body)
    except TimeoutError:
        raise _Unreachable(f"gave no answer within {timeout:g}s") from None
    except aiohttp.ClientResponseError as e:  # includes too many redirects
        raise ValueError(f"answered badly: {e.message}") from None
    except aiohttp.ClientError as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise _Unreachable(f"could not be fetched: {text}") from None


async def resolve_providers(session: aiohttp.ClientSession,
                            providers: Mapping[str, ProviderConfig], *,
                            timeout: float = 10.0,  # noqa: ASYNC109
                            cache: MutableMapping[str, Metadata] | None = None,
                            ) -> dict[str, ProviderConfig]:
    """Every provider, with the endpoints its issuer's metadata supplies filled in.

    Providers without an issuer, or with every endpoint configured, are returned as they
    are. One fetch per distinct issuer, concurrently; results are cached per issuer in
    ``cache`` (by default, for the life of the process). A provider whose discovery fails is
    returned not usable, with a reason naming it; nothing is raised.
    """
    cache = _CACHE if cache is None else cache
    wanted = {str(p.issuer): p.name for p in providers.values() if needs_discovery(p)}
    errors: dict[str, DiscoveryError] = {}

    async def one(issuer: str, first_provider: str) -> None:
        try:
            cache[issuer] = await discover(session, URL(issuer), timeout=timeout,
                                           provider=first_provider)
        except DiscoveryError as e:
            errors[issuer] = e

    await asyncio.gather(*(one(i, n) for i, n in wanted.items() if i not in cache))
    out: dict[str, ProviderConfig] = {}
    for name, provider in providers.items():
        if not needs_discovery(provider):
            out[name] = provider
            continue
        issuer = str(provider.issuer)
        meta = cache.get(issuer)
        if meta is not None:
            out[name] = apply_metadata(provider, meta)
        else:
            out[name] = mark_failed(provider, errors[issuer])
            log.warning("provider %s is not usable: %s", name, out[name].discovery_error)
    return out


async def check(provider: ProviderConfig, *,
                timeout: float = 10.0) -> Metadata:  # noqa: ASYNC109
    """For ``gateway check --online``: fetch the provider's metadata now, uncached.

    Raises :class:`DiscoveryError` when it cannot be fetched, or when the provider would
    still lack its token (or authorization) endpoint after applying it.
    """
    if provider.issuer is None:
        raise ValueError(f"provider {provider.name!r} has no issuer")
    async with aiohttp.ClientSession() as session:
        meta = await discover(session, provider.issuer, timeout=timeout, provider=provider.name)
    resolved = apply_metadata(provider, meta)
    lacking = [p for p in resolved.problems if p.startswith(("no token_url", "no authorize_url"))]
    if lacking:
        raise DiscoveryError("; ".join(lacking), issuer=str(provider.issuer),
                             provider=provider.name)
    return meta


def clear_cache() -> None:
    """Forget every cached discovery result (tests; a config reload)."""
    _CACHE.clear()
