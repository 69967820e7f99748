"""Rendering of the gateway's own HTML pages, and the security headers every response under
``/_gateway/`` carries.

The headers are added in one ``on_response_prepare`` hook rather than by each handler, so
pages, redirects, error pages from the middleware, the router's own 404/405 answers and static
files all get them, and a new handler cannot forget them. Proxied responses (every path
outside ``/_gateway/``) are left exactly as the upstream sent them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web
from yarl import URL

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
PREFIX = "/_gateway/"
STATIC_PREFIX = "/_gateway/static/"

# No inline script or style anywhere: the CSP forbids both, and the pages need neither.
# ``form-action`` also governs where a submitted form may be redirected (CSP3 §6.3.1), so the
# connect buttons' redirect to a provider needs that provider's authorize origin listed.
_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action {forms}; "
        "frame-ancestors 'none'; base-uri 'none'")

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": _CSP.format(forms="'self'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC_CACHE = "public, max-age=3600"


def content_security_policy(form_origins: Iterable[str] = ()) -> str:
    """The pages' CSP, letting forms lead to ``'self'`` and the given origins only."""
    extra = sorted({o for o in form_origins if o})
    return _CSP.format(forms=" ".join(["'self'", *extra]))


def authorize_origins(providers: Iterable[Any]) -> list[str]:
    """The origins of the usable providers' authorization endpoints (where a connect form
    leads)."""
    out: list[str] = []
    for p in providers:
        if not getattr(p, "usable", True):
            continue
        url: URL | None = getattr(p, "authorize_url", None)
        if url is not None and url.is_absolute() and url.scheme in ("http", "https"):
            out.append(str(url.origin()))
    return out


def _app_form_origins(app: web.Application) -> list[str]:
    from gateway.app import SERVICES  # late: gateway.app imports this module

    services = app.get(SERVICES)
    return authorize_origins(services.providers.values()) if services is not None else []


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if not request.path.startswith(PREFIX):
        return  # a proxied response passes through unchanged
    headers = response.headers
    if request.path.startswith(STATIC_PREFIX) and response.status < 400:
        headers["X-Content-Type-Options"] = "nosniff"
        headers.setdefault("Cache-Control", STATIC_CACHE)
        return
    for name, value in SECURITY_HEADERS.items():
        if name == "Cache-Control":
            headers[name] = value  # nothing the gateway itself serves may be cached
        elif name not in headers:
            headers[name] = value
    headers["Content-Security-Policy"] = content_security_policy(_app_form_origins(request.app))


def setup(app: web.Application) -> None:
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    app.router.add_static(STATIC_PREFIX, STATIC, name="static")
    app.on_response_prepare.append(_add_security_headers)


def render(request: web.Request, template: str, context: Mapping[str, Any] | None = None,
           *, status: int = 200) -> web.Response:
    """A page from ``templates/``; the security headers are added when it is sent."""
    resp = aiohttp_jinja2.render_template(template, request, dict(context or {}), status=status)
    resp.headers.update(SECURITY_HEADERS)
    return resp


def message(request: web.Request, title: str, text: str, *, status: int = 200,
            next_url: str | None = None, next_label: str | None = None,
            code: str | None = None) -> web.Response:
    """A plain page for outcomes and errors: what happened, and what to do next."""
    next_url = next_url or "/_gateway/"
    resp = render(request, "message.html", {
        "title": title, "text": text, "next_url": next_url,
        "next_label": next_label or "Back to the dashboard", "code": code,
        "ok": status < 400, "show_home": next_url != "/_gateway/",
    }, status=status)
    if code:
        resp.headers["Gateway-Error"] = code
    return resp


def redirect(location: str, status: int = 302) -> web.Response:
    resp = web.Response(status=status, headers={"Location": location})
    resp.headers.update(SECURITY_HEADERS)
    return resp
