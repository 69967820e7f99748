"""Rendering of the gateway's own HTML pages, with the security headers every page carries."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

# No inline script or style anywhere: the CSP forbids both, and the pages need neither.
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self' https: http:; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def setup(app: web.Application) -> None:
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    app.router.add_static("/_gateway/static/", STATIC, name="static")


def render(request: web.Request, template: str, context: Mapping[str, Any] | None = None,
           *, status: int = 200) -> web.Response:
    resp = aiohttp_jinja2.render_template(template, request, dict(context or {}), status=status)
    resp.headers.update(SECURITY_HEADERS)
    return resp


def message(request: web.Request, title: str, text: str, *, status: int = 200,
            next_url: str | None = None, next_label: str | None = None,
            code: str | None = None) -> web.Response:
    """A plain page for outcomes and errors: what happened, and what to do next."""
    resp = render(request, "message.html", {
        "title": title, "text": text, "next_url": next_url or "/_gateway/",
        "next_label": next_label or "Back to the dashboard", "code": code,
        "ok": status < 400,
    }, status=status)
    if code:
        resp.headers["Gateway-Error"] = code
    return resp


def redirect(location: str, status: int = 302) -> web.Response:
    resp = web.Response(status=status, headers={"Location": location})
    resp.headers.update(SECURITY_HEADERS)
    return resp
