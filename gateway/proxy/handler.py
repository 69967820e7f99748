"""The proxy handler: authenticate, take a token, stream the exchange with the upstream.

Theory of operation. For ``/<provider>/<path>?<query>`` the handler

1. refuses CONNECT (405) and any target :func:`~gateway.proxy.routing.parse_target`
   rejects (400: absolute form, dot-segments and encoded tricks, control characters);
2. authenticates the identity, resolves the provider (404 unknown, 503 not configured)
   and which of its API bases the path is for (:func:`~gateway.proxy.routing.choose_upstream`,
   404 ``unknown_upstream``), and refuses a declared ``Content-Length`` above
   ``server.max_body_bytes`` (413);
3. leases a token and sends the request to ``<upstream base><path>?<query>``, byte for byte,
   with the header policy of :mod:`gateway.proxy.headers` (the token under the provider's
   ``upstream_auth_scheme``);
4. streams the upstream's answer back unchanged (status, reason, headers minus hop-by-hop,
   body still compressed); redirects are returned, never followed.

Bodies stream both ways through aiohttp's bounded buffers (backpressure on both sockets);
the only buffering is the *replay buffer*: a request body of at most
``server.replay_body_bytes`` is read whole first, so that when the upstream answers 401 to a
token we believed valid, the request can be sent once more with a refreshed token
(``TokenSource.rejected``). A larger or unsized-and-long body streams at once and its 401
passes through. A body that grows past ``max_body_bytes`` while streaming is cut off: 413
if the upstream has not answered yet.

Errors before the response starts are raised as ``GatewayError`` (the edge middleware
renders them): refused or reset connections 502, timeouts 504. Once the response has
started nothing is rewritten: an upstream failure aborts the client connection, so the
client sees a truncated body rather than a plausible-looking one. A client that goes away
cancels this handler (the server runs with ``handler_cancellation=True``) or fails a write;
either way the upstream response is closed, which closes its connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from gateway.config import ProviderConfig, ServerConfig
from gateway.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    PayloadTooLarge,
    ProviderNotConfigured,
    UnknownProvider,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.proxy import websocket
from gateway.proxy.headers import Forwarded, authorization_value, request_headers, response_headers
from gateway.proxy.routing import (
    UpstreamChoice,
    base_url,
    choose_upstream,
    parse_target,
    rewrite_location,
    upstream_url,
)
from gateway.store.base import Identity
from gateway.tokens.source import Lease, TokenSource

log = logging.getLogger("gateway.proxy")

__all__ = ["ProviderNotConfigured", "ProxyHandler", "make_client_session", "refuse_connect"]

Authenticate = Callable[[web.Request], Awaitable[Identity]]
RequestId = Callable[[web.Request], str | None]
OnUpstream = Callable[[web.Request, str, int, float], None]

# Headers the client library would otherwise invent; a transparent proxy sends only what the
# client sent (an invented Accept-Encoding would even make upstreams compress unasked).
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_HELD_401_LIMIT = 64 * 1024  # a 401 body is held while we refresh; larger ones just stream


def make_client_session(server: ServerConfig) -> aiohttp.ClientSession:
    """The one pooled upstream session: keep-alive, no cookies, no decompression.

    The session does not ask for compression (no automatic ``Accept-Encoding``) since it never
    decompresses; other users of the session (the OAuth client) get identity bodies.
    """
    connector = aiohttp.TCPConnector(limit=server.pool_limit,
                                     limit_per_host=server.pool_limit_per_host)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=server.connect_timeout,
                                    sock_read=server.read_timeout)
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("Accept-Encoding",),
        middlewares=(websocket.upgrade_guard,), trust_env=False)


@web.middleware
async def refuse_connect(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    """405 for CONNECT, whose authority-form target matches no route (it would be a 404).
    Install it inside (after) the error middleware."""
    if request.method == hdrs.METH_CONNECT:
        raise MethodNotAllowed("CONNECT is not supported: the gateway is not a forward proxy.")
    return await handler(request)


@dataclass(frozen=True, slots=True)
class _Route:
    """Where one request goes."""

    identity: Identity
    provider: ProviderConfig
    choice: UpstreamChoice


class _Upload:
    """A request body streamed upstream; counts bytes and remembers why it stopped.

    aiohttp wraps an exception raised by a body iterator in a ``ClientConnectionError``, so
    the reason is kept here for the handler to report.
    """

    def __init__(self, content: aiohttp.StreamReader, prefix: bytes, limit: int) -> None:
        self._content, self._prefix, self._limit = content, prefix, limit
        self.too_large = False
        self.client_failed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        total = len(self._prefix)
        if self._prefix:
            yield self._prefix
        while True:
            try:
                chunk = await self._content.readany()
            except (ConnectionError, HttpProcessingError):
                self.client_failed = True
                raise
            if not chunk:
                return
            total += len(chunk)
            if total > self._limit:
                self.too_large = True
                raise PayloadTooLarge("The request body is too large.")
            yield chunk


class ProxyHandler:
    """Serves every path outside ``/_gateway/``; see the module docstring."""

    def __init__(self, providers: Mapping[str, ProviderConfig], server: ServerConfig,
                 session: aiohttp.ClientSession, tokens: TokenSource,
                 authenticate: Authenticate, *, request_id: RequestId | None = None,
                 on_upstream: OnUpstream | None = None) -> None:
        """``request_id`` gives the id sent upstream as ``X-Request-Id``; ``on_upstream``
        hears (request, provider, status, seconds to the response headers) per attempt."""
        self._providers = providers
        self._server = server
        self._session = session
        self._tokens = tokens
        self._authenticate = authenticate
        self._request_id = request_id
        self._on_upstream = on_upstream

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == hdrs.METH_CONNECT:
            raise MethodNotAllowed("CONNECT is not supported: the gateway is not a forward proxy.")
        target = parse_target(request.raw_path)
        identity = await self._authenticate(request)
        provider = self._provider(target.provider)
        choice = choose_upstream(provider, target)
        length = request.content_length
        if length is not None and length > self._server.max_body_bytes:
            raise PayloadTooLarge(
                f"The request body is larger than {self._server.max_body_bytes} bytes.")
        route = _Route(identity, provider, choice)
        lease = await self._tokens.lease(identity, provider.name)
        if websocket.is_upgrade(request):
            return await self._websocket(request, route, lease)
        return await self._forward(request, route, lease)

    def _provider(self, name: str) -> ProviderConfig:
        provider = self._providers.get(name)
        if provider is None:
            raise UnknownProvider(f"No provider named {name!r} is configured.", provider=name)
        if not provider.usable:
            raise ProviderNotConfigured(
                f"Provider {name!r} is not configured yet: {'; '.join(provider.problems)}.",
                provider=name)
        return provider

    # ------------------------------------------------------------------ HTTP

    async def _forward(self, request: web.Request, route: _Route,
                       lease: Lease) -> web.StreamResponse:
        replay, upload = await self._read_body(request)
        for attempt in (1, 2):
            base = self._base(route, lease)
            data = upload.chunks() if upload is not None else replay
            up = await self._send(request, route, lease, data, upload)
            try:
                held, complete = b"", False
                if up.status == 401 and upload is None and attempt == 1:
                    try:
                        held, complete = await _read_at_most(up, _HELD_401_LIMIT)
                    except (aiohttp.ClientError, TimeoutError) as e:
                        raise self._translate(e, route, None) from None
                    if complete:
                        up.release()
                        new = await self._tokens.rejected(route.identity, route.provider.name,
                                                          lease)
                        if new is not None:
                            lease = new
                            continue
                return await self._respond(request, route, base, up, held, complete)
            except BaseException:
                up.close()
                raise
            finally:
                up.release()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_body(self, request: web.Request) -> tuple[bytes | None, _Upload | None]:
        """The whole body if it fits the replay buffer, else an upload streaming it."""
        if not request.body_exists:
            return None, None
        limit = self._server.replay_body_bytes
        max_body = self._server.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            return None, _Upload(request.content, b"", max_body)
        buf = bytearray()
        try:
            while len(buf) <= limit:
                chunk = await request.content.readany()
                if not chunk:
                    return bytes(buf), None
                buf += chunk
                if len(buf) > max_body:
                    raise PayloadTooLarge(f"The request body is larger than {max_body} bytes.")
        except (ConnectionError, HttpProcessingError):
            raise BadRequest("The request body ended early.") from None
        return None, _Upload(request.content, bytes(buf), max_body)

    def _base(self, route: _Route, lease: Lease) -> URL:
        base = base_url(route.provider, route.choice, lease.upstream)
        if base is None:  # upstream_from_token, and the token response named no usable base
            name = route.provider.name
            raise UpstreamUnreachable(f"The token response of {name!r} named no usable API "
                                      "base URL.", provider=name)
        return base

    def _headers(self, request: web.Request, route: _Route, lease: Lease, *,
                 websocket: bool = False) -> Mapping[str, str]:
        fwd = None
        if self._server.forwarded_headers:
            fwd = Forwarded(client=request.remote, proto=request.scheme,
                            host=request.headers.get(hdrs.HOST))
        out = request_headers(request.headers,
                              authorization=authorization_value(
                                  lease.token_type, lease.access_token,
                                  route.provider.upstream_auth_scheme),
                              forwarded=fwd, websocket=websocket)
        rid = self._request_id(request) if self._request_id is not None else None
        if rid:
            out["X-Request-Id"] = rid
        return out

    async def _send(self, request: web.Request, route: _Route, lease: Lease,
                    data: bytes | AsyncIterator[bytes] | None,
                    upload: _Upload | None) -> aiohttp.ClientResponse:
        url = upstream_url(self._base(route, lease), route.choice.target)
        try:
            started = time.perf_counter()
            up = await self._session.request(
                request.method, url, headers=self._headers(request, route, lease), data=data,
                allow_redirects=False, auto_decompress=False,
                skip_auto_headers=_NO_AUTO_HEADERS)
            if self._on_upstream is not None:
                self._on_upstream(request, route.provider.name, up.status,
                                  time.perf_counter() - started)
            return up
        except GatewayError:
            raise
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._translate(e, route, upload) from None

    def _translate(self, e: BaseException, route: _Route, upload: _Upload | None
                   ) -> GatewayError:
        name = route.provider.name
        if upload is not None and upload.too_large:
            return PayloadTooLarge(
                f"The request body is larger than {self._server.max_body_bytes} bytes.")
        if upload is not None and upload.client_failed:
            return BadRequest("The request body ended early.")
        # The exception text may hold the URL; its type name is enough to diagnose.
        log.info("upstream of %s failed: %s", name, type(e).__name__)
        if isinstance(e, TimeoutError):
            return UpstreamTimeout(f"The upstream of {name!r} did not answer in time.",
                                   provider=name)
        return UpstreamUnreachable(f"The upstream of {name!r} could not be reached.",
                                   provider=name)

    async def _respond(self, request: web.Request, route: _Route, base: URL,
                       up: aiohttp.ClientResponse, prefix: bytes, complete: bool
                       ) -> web.StreamResponse:
        """Stream ``up`` back: ``prefix`` (bytes of it already read), then the rest unless
        ``complete`` says the prefix is the whole body."""
        gateway = self._gateway_prefix(route)
        headers = response_headers(up.headers,
                                   lambda location: rewrite_location(location, base, gateway))
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        try:
            await resp.prepare(request)
            if prefix:
                await resp.write(prefix)
            if not complete:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            await resp.write_eof()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            # The upstream broke (or timed out) mid-body, or the client went away; the
            # caller closes the upstream response either way.
            log.info("proxying from %s stopped mid-response: %s", route.provider.name,
                     type(e).__name__)
            _abort(request)
        except Exception:
            log.exception("proxying from %s failed mid-response", route.provider.name)
            _abort(request)
        return resp

    def _gateway_prefix(self, route: _Route) -> URL:
        """The gateway URL that maps onto the chosen base (``/<provider>[/<name>]``)."""
        public = self._server.public_url
        return URL.build(scheme=public.scheme, authority=public.raw_authority,
                         path=f"{public.raw_path.rstrip('/')}{route.choice.prefix}",
                         encoded=True)

    # ------------------------------------------------------------------ WebSocket

    async def _websocket(self, request: web.Request, route: _Route,
                         lease: Lease) -> web.StreamResponse:
        if not web.WebSocketResponse().can_prepare(request):
            raise BadRequest("Invalid WebSocket handshake.")
        for attempt in (1, 2):
            base = self._base(route, lease)
            try:
                upstream = await self._session.ws_connect(
                    upstream_url(base, route.choice.target),
                    headers=self._headers(request, route, lease, websocket=True),
                    protocols=websocket.offered_protocols(request),
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0))
            except websocket.UpgradeRefused as refused:
                if refused.status == 401 and attempt == 1:
                    new = await self._tokens.rejected(route.identity, route.provider.name,
                                                      lease)
                    if new is not None:
                        lease = new
                        continue
                return self._refusal(route, base, refused)
            except aiohttp.WSServerHandshakeError as e:  # a 101 with a broken handshake
                raise UpstreamUnreachable(
                    f"The upstream of {route.provider.name!r} broke the WebSocket handshake.",
                    provider=route.provider.name) from e
            except (aiohttp.ClientError, TimeoutError) as e:
                raise self._translate(e, route, None) from None
            return await websocket.relay(request, upstream)
        raise AssertionError("unreachable")  # pragma: no cover

    def _refusal(self, route: _Route, base: URL,
                 refused: websocket.UpgradeRefused) -> web.Response:
        gateway = self._gateway_prefix(route)
        headers = response_headers(refused.headers,
                                   lambda location: rewrite_location(location, base, gateway))
        headers.popall(hdrs.CONTENT_LENGTH, None)  # set from the (raw, held) body
        return web.Response(status=refused.status, reason=refused.reason, headers=headers,
                            body=refused.body)


async def _read_at_most(up: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of ``up``'s body, and whether that is all of it."""
    buf = bytearray()
    async for chunk in up.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            return bytes(buf), False
    return bytes(buf), True


def _abort(request: web.Request) -> None:
    """End a started response without its proper end, so the client sees it truncated."""
    if request.transport is not None:
        request.transport.abort()
