"""The edge: the one place where errors become HTTP responses.

Handlers and the layers below raise :class:`~gateway.errors.GatewayError`; this middleware
renders it as JSON ``{"error", "message", ...}`` with a ``Gateway-Error`` header. Anything
else becomes a 500 ``internal`` without details (the traceback goes to the log, which never
contains secrets). A response that already started streaming is never rewritten: the
handler aborts the connection instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import GatewayError

log = logging.getLogger("gateway.error")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: GatewayError) -> web.Response:
    resp = web.json_response(err.body(), status=err.status)
    resp.headers.update(err.headers())
    resp.headers["Cache-Control"] = "no-store"
    return resp


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        if err.body().get("message") != err.message:  # the detail is for operators only
            log.warning("%s on %s %s: %s", err.code, request.method, request.rel_url.path,
                        err.message)
        return error_response(err)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.rel_url.path)
        return error_response(GatewayError("internal error"))
