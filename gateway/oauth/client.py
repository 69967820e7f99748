"""The thin I/O half of the OAuth layer: send what :mod:`~gateway.oauth.protocol` builds.

Every outcome is a value: a :class:`~gateway.oauth.protocol.TokenGrant` or an
:class:`~gateway.oauth.protocol.OAuthError`. Network failures, timeouts, redirects and
oversized bodies become ``OAuthError(transient=True)``, so the token manager keeps the tokens
it has and answers ``token_endpoint_unavailable`` instead of losing a connection to a blip.
Only cancellation propagates (a cancelled caller must stay cancelled).

Redirects are never followed at the token endpoint: the request carries the client secret
and a code or refresh token, and a redirect would replay them to wherever it points.
"""

from __future__ import annotations

import logging
import time

import aiohttp

from gateway.config import ProviderConfig
from gateway.oauth.protocol import (
    OAuthError,
    ResponseQuirks,
    TokenGrant,
    TokenRequest,
    client_credentials_request,
    code_request,
    parse_revocation_response,
    parse_token_response,
    refresh_request,
    revocation_request,
)

log = logging.getLogger("gateway.oauth")

MAX_BODY = 1024 * 1024  # a token response is a few KiB; anything near 1 MiB is not one


class _Answer:
    __slots__ = ("body", "content_type", "retry_after", "status")

    def __init__(self, status: int, content_type: str | None, body: bytes,
                 retry_after: str | None) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body
        self.retry_after = retry_after


def _unavailable(why: str, status: int | None = None) -> OAuthError:
    return OAuthError("temporarily_unavailable", why, status=status, transient=True)


class OAuthClient:
    """Talks to token and revocation endpoints over a shared :class:`aiohttp.ClientSession`."""

    def __init__(self, session: aiohttp.ClientSession, *, timeout: float = 15.0) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def exchange_code(self, provider: ProviderConfig, *, code: str, redirect_uri: str,
                            code_verifier: str | None, now: float) -> TokenGrant | OAuthError:
        """Authorization code grant (RFC 6749 §4.1.3) with the PKCE verifier (RFC 7636 §4.5)."""
        req = code_request(provider, code, redirect_uri, code_verifier)
        return await self._token(provider, req, provider.scopes, now)

    async def refresh(self, provider: ProviderConfig, refresh_token: str, *,
                      scopes: tuple[str, ...], now: float) -> TokenGrant | OAuthError:
        """Refresh (RFC 6749 §6). ``scopes`` (the connection's granted scopes, or ``()``) are
        sent and assumed granted when the answer omits ``scope``. The grant's
        ``refresh_token`` is ``None`` when the server did not rotate it: keep the old one."""
        req = refresh_request(provider, refresh_token, scopes)
        return await self._token(provider, req, scopes, now)

    async def client_credentials(self, provider: ProviderConfig, *,
                                 now: float) -> TokenGrant | OAuthError:
        """Client credentials grant (RFC 6749 §4.4)."""
        req = client_credentials_request(provider)
        return await self._token(provider, req, provider.scopes, now)

    async def revoke(self, provider: ProviderConfig, token: str,
                     token_type_hint: str | None) -> OAuthError | None:
        """Revoke a token (RFC 7009, or the provider's ``revocation_method``); ``None`` on
        success, and when the method has nothing to send for this token (a refresh token, for
        methods that revoke the grant through its access token)."""
        if provider.revocation_url is None:
            return OAuthError("unsupported", "provider has no revocation endpoint")
        req = revocation_request(provider, token, token_type_hint)
        if req is None:
            return None
        answer = await self._post(req)
        if isinstance(answer, OAuthError):
            return answer
        # Wall clock only to read an HTTP-date Retry-After; nothing else here needs time.
        err = parse_revocation_response(answer.status, answer.content_type, answer.body,
                                        now=time.time(), retry_after=answer.retry_after)
        return None if err is None else err.redacted(req.secret_values())

    # ------------------------------------------------------------------ internals

    async def _token(self, provider: ProviderConfig, req: TokenRequest,
                     requested: tuple[str, ...], now: float) -> TokenGrant | OAuthError:
        # ``now`` is taken before the request: expires_at errs on the early side.
        answer = await self._post(req)
        if isinstance(answer, OAuthError):
            result: TokenGrant | OAuthError = answer
        else:
            result = parse_token_response(answer.status, answer.content_type, answer.body,
                                          requested_scopes=requested, now=now,
                                          retry_after=answer.retry_after,
                                          quirks=ResponseQuirks.of(provider))
        if isinstance(result, OAuthError):
            result = result.redacted(req.secret_values())
            log.info("token request to provider %s failed: %s", provider.name, result)
        return result

    async def _post(self, req: TokenRequest) -> _Answer | OAuthError:
        try:
            async with self._session.post(req.url, data=req.body(), headers=req.headers,
                                          allow_redirects=False,
                                          timeout=self._timeout) as resp:
                if (resp.content_length or 0) > MAX_BODY:
                    return _unavailable("response body is too large", resp.status)
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > MAX_BODY:
                        return _unavailable("response body is too large", resp.status)
                return _Answer(resp.status, resp.headers.get("Content-Type"), bytes(body),
                               resp.headers.get("Retry-After"))
        except TimeoutError:
            return _unavailable("endpoint timed out")
        except aiohttp.ClientError as e:
            # The exception text may contain the URL; its type name is enough to diagnose.
            return _unavailable(f"endpoint unreachable ({type(e).__name__})")
