"""WebSocket proxying: an upstream handshake carrying the token, then a message relay.

Theory of operation. The handler opens the upstream connection first (``ws_connect`` with
the token in ``Authorization``) and only then accepts the client's upgrade, offering the
subprotocol the upstream chose. Two pumps copy text and binary messages, one per direction.
When a side sends a close frame, its code and reason are passed on to the other side and
both close handshakes are completed; when a side fails or vanishes, the other is closed
with 1014 (bad gateway: the upstream failed) or 1001 (going away: the client left).
Pings are answered per hop (``autoping``), not relayed.

``ws_connect`` follows redirects and drops non-101 bodies, both wrong for a token gateway
(SPEC invariant 4; upstream answers pass through). :func:`upgrade_guard` is a client
middleware that stops every non-101 answer to an upgrade request before either happens and
raises :class:`UpgradeRefused` carrying the full answer, so the handler can pass it back.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, WSCloseCode, WSMsgType, web
from multidict import CIMultiDictProxy

log = logging.getLogger("gateway.proxy")

__all__ = ["UpgradeRefused", "is_upgrade", "offered_protocols", "relay", "upgrade_guard"]

REFUSAL_BODY_LIMIT = 64 * 1024
_UNSENDABLE = frozenset({1005, 1006, 1015})  # RFC 6455 §7.4.1: never sent in a close frame
_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
_Outcome = tuple[str, int | None, bytes]  # ("close" | "src_failed" | "dst_failed", code, reason)


class UpgradeRefused(Exception):
    """The upstream answered an upgrade request with something other than 101."""

    def __init__(self, status: int, reason: str | None, headers: CIMultiDictProxy[str],
                 body: bytes) -> None:
        super().__init__(f"upstream refused the upgrade with {status}")
        self.status, self.reason, self.headers, self.body = status, reason, headers, body


async def upgrade_guard(req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
    """Client middleware: a non-101 answer to an upgrade is raised, never followed."""
    resp = await handler(req)
    if resp.status == 101 or req.headers.get("Upgrade", "").lower() != "websocket":
        return resp
    body = bytearray()
    try:
        while len(body) < REFUSAL_BODY_LIMIT:
            chunk = await resp.content.read(REFUSAL_BODY_LIMIT - len(body))
            if not chunk:
                break
            body += chunk
    except (aiohttp.ClientError, TimeoutError):
        pass  # pass on what arrived; the status and headers are what matter
    finally:
        resp.close()
    raise UpgradeRefused(resp.status, resp.reason, resp.headers, bytes(body))


def is_upgrade(request: web.BaseRequest) -> bool:
    connection = {t.strip().lower() for h in request.headers.getall("Connection", ())
                  for t in h.split(",")}
    return (request.method == "GET" and "upgrade" in connection
            and request.headers.get("Upgrade", "").lower() == "websocket")


def offered_protocols(request: web.BaseRequest) -> tuple[str, ...]:
    return tuple(p.strip() for h in request.headers.getall("Sec-WebSocket-Protocol", ())
                 for p in h.split(",") if p.strip())


def _sendable(code: int | None, fallback: int) -> int:
    if code is None or code in _UNSENDABLE or not 1000 <= code <= 4999:
        return fallback
    return code


async def relay(request: web.Request, upstream: aiohttp.ClientWebSocketResponse
                ) -> web.WebSocketResponse:
    """Accept the client's upgrade and relay until either side closes."""
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=False)
    try:
        await client.prepare(request)
    except BaseException:
        await upstream.close(code=WSCloseCode.GOING_AWAY)
        raise
    # What to tell one side when the other fails: the upstream failing is a bad gateway,
    # the client failing means it went away.
    fallback = {id(upstream): WSCloseCode.BAD_GATEWAY, id(client): WSCloseCode.GOING_AWAY}
    pumps: dict[asyncio.Task[_Outcome], tuple[_Socket, _Socket]] = {
        asyncio.create_task(_pump(client, upstream)): (client, upstream),
        asyncio.create_task(_pump(upstream, client)): (upstream, client)}
    try:
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done))
        src, dst = pumps[first]
        outcome, code, reason = first.result()
        if outcome == "close":  # pass the close on, then answer the closer's frame
            await dst.close(code=_sendable(code, WSCloseCode.OK), message=reason)
            await src.close(code=_sendable(code, WSCloseCode.OK))
        else:
            failed, other = (src, dst) if outcome == "src_failed" else (dst, src)
            await other.close(code=fallback[id(failed)])
            await failed.close(code=WSCloseCode.GOING_AWAY)
        await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        for task in pumps:
            task.cancel()
        if not upstream.closed:
            await upstream.close(code=WSCloseCode.GOING_AWAY)
    return client


async def _pump(src: _Socket, dst: _Socket) -> _Outcome:
    """Copy messages from ``src`` to ``dst`` until one of them stops."""
    while True:
        msg = await src.receive()
        try:
            if msg.type is WSMsgType.TEXT:
                await dst.send_str(msg.data)
                continue
            if msg.type is WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
                continue
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return "dst_failed", None, b""
        if msg.type is WSMsgType.CLOSE:
            reason = (msg.extra or "").encode()[:123]  # RFC 6455 §5.5: 125-byte payload
            return "close", msg.data, reason.decode("utf-8", "ignore").encode()
        if msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            if msg.type is WSMsgType.ERROR:
                log.info("websocket relay: %s", type(msg.data).__name__)
            return "src_failed", None, b""
        # PING and PONG are answered per hop (autoping) and never reach here.
