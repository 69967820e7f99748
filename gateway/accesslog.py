"""What the gateway writes about each request, and how every log line is kept free of secrets.

Three parts:

* :class:`Redactor` scrubs text. It knows the *shapes* of secrets (gateway keys ``gwk_…``,
  ``Bearer``/``Basic`` credentials, JWTs, ``access_token=``/``"refresh_token": "…"``/
  ``code=``/``client_secret=``… parameters, ``Authorization``/``Cookie``/``Set-Cookie``
  header values, the gateway's cookies, passwords in URLs) and the exact *values* it was
  told about: configured secrets (client secrets, the admin key; replaced on reload) as
  substrings, and tokens or keys seen at run time as whole words (a set lookup per word, so
  thousands of them cost nothing per line).
* :func:`install_redaction` makes the logging module scrub every record as it is created
  (message, arguments and traceback), so no handler, ours or a library's, can write a
  secret; :class:`StructuredFormatter` scrubs the structured fields too and writes JSON or
  logfmt lines.
* :class:`RequestObserver` is the outermost middleware: it gives each request an id (from
  a well-formed ``X-Request-Id``, else a new one; the proxy sends it upstream), counts the
  request in the metrics and writes one ``gateway.access`` line when it is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.metrics import GATEWAY_LABEL, Metrics

ACCESS_LOG = logging.getLogger("gateway.access")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("gateway.request_id")
UPSTREAM_STATUS: web.RequestKey[int] = web.RequestKey("gateway.upstream_status")
MASK = "[REDACTED]"
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_PROBES = frozenset({"/_gateway/healthz", "/_gateway/readyz", "/_gateway/metrics"})

# --------------------------------------------------------------------------- redaction

_SHAPES = re.compile(
    # 1. header values: Authorization: ..., 'Cookie': '...', set-cookie=...
    r"(?P<h>(?<![\w-])(?:proxy-authorization|authorization|set-cookie|cookie|x-api-key)"
    r"[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n,}]+"
    # 2. OAuth and credential parameters in forms, queries, JSON and reprs
    r"|(?P<p>(?<![\w-])(?:access_token|refresh_token|id_token|client_secret|code_verifier"
    r"|client_assertion|assertion|password|passwd|api_key|admin_key|secret|token|code|state)"
    r"[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,;}\]]+"
    # 3. credentials after an auth scheme
    r"|(?P<s>(?<![\w-])(?:bearer|basic|dpop)\s+)[A-Za-z0-9._~+/=-]{8,}"
    # 4. gateway keys: the 12-character display prefix may stay, the rest may not
    r"|(?P<k>gwk_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]+"
    # 5. JWTs (id tokens, JWT access tokens)
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"
    # 6. the gateway's own cookies
    r"|(?P<c>(?<![\w-])gateway_[A-Za-z0-9_]+=)[^;\s\"',]+"
    # 7. passwords in URLs
    r"|(?P<u>://)[^/\s:@\"']+:[^/\s@\"']+@",
    re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z0-9._~+/-]{12,}=*")
_MIN_SECRET = 8


def _mask_shape(m: re.Match[str]) -> str:
    for group in ("h", "p", "s", "k", "c"):
        if m.group(group) is not None:
            return m.group(group) + MASK
    if m.group("u") is not None:
        return f"://{MASK}@"
    return MASK


class Redactor:
    """Scrubs secrets out of text; see the module docstring."""

    def __init__(self, max_values: int = 100_000) -> None:
        self._static: dict[str, frozenset[str]] = {}
        self._static_re: re.Pattern[str] | None = None
        self._values: OrderedDict[str, None] = OrderedDict()
        self._max_values = max_values

    def set_static(self, source: str, values: Iterable[str | None]) -> None:
        """The configured secrets from ``source`` (replacing its earlier set)."""
        self._static[source] = frozenset(v for v in values if v and len(v) >= _MIN_SECRET)
        every = sorted({v for vs in self._static.values() for v in vs}, key=len, reverse=True)
        self._static_re = re.compile("|".join(map(re.escape, every))) if every else None

    def register(self, value: str | None) -> None:
        """A secret seen at run time (a token, a key); remembered up to ``max_values``."""
        if not value or len(value) < _MIN_SECRET:
            return
        if value in self._values:
            return
        self._values[value] = None
        if len(self._values) > self._max_values:
            self._values.popitem(last=False)

    def __call__(self, text: str) -> str:
        if self._static_re is not None:
            text = self._static_re.sub(MASK, text)
        text = _SHAPES.sub(_mask_shape, text)
        if self._values:
            text = _WORD.sub(self._mask_word, text)
        return text

    def _mask_word(self, m: re.Match[str]) -> str:
        word = m.group(0)
        if word in self._values or word.rstrip(".") in self._values:
            return MASK
        return word


REDACT = Redactor()
"""The process's redactor: the app registers its configured secrets and live tokens here."""


def install_redaction(redact: Redactor = REDACT) -> Callable[[], None]:
    """Make every log record scrub itself on creation; returns a function undoing it."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        scrub_record(record, redact)
        return record

    logging.setLogRecordFactory(factory)
    return lambda: logging.setLogRecordFactory(previous)


def scrub_record(record: logging.LogRecord, redact: Redactor = REDACT) -> None:
    """Format the record's message (and traceback) now, scrubbed, so no handler sees more."""
    try:
        message = record.getMessage()
    except Exception:  # a broken format string; logging would fail on it anyway
        message = f"unformattable log message from {record.name}"
    record.msg, record.args = redact(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


# --------------------------------------------------------------------------- formatting


class StructuredFormatter(logging.Formatter):
    """One JSON object or one logfmt line per record: ``ts level logger pid msg`` and the
    record's ``fields`` (the access log's), every string scrubbed."""

    def __init__(self, style: str = "json", redact: Redactor = REDACT) -> None:
        super().__init__()
        if style not in ("json", "logfmt"):
            raise ValueError("log format must be json or logfmt")
        self.style = style
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"ts": ts.replace("+00:00", "Z"),
                               "level": record.levelname.lower(), "logger": record.name,
                               "pid": record.process, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update((k, v) for k, v in fields.items() if k not in out)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        clean = {k: self._redact(v) if isinstance(v, str) else v for k, v in out.items()}
        if self.style == "json":
            return json.dumps(clean, ensure_ascii=False, default=str)
        return " ".join(f"{k}={_logfmt(v)}" for k, v in clean.items() if v is not None)


def _logfmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def setup_logging(style: str = "json", level: int | str = logging.INFO) -> None:
    """Structured lines on stderr, scrubbed (idempotent: a second call changes the style)."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_gateway", False)]
    handler = ours[0] if ours else logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(style))
    if not ours:
        handler._gateway = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        install_redaction()
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = True  # ours is gateway.access


# --------------------------------------------------------------------------- access log

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestObserver:
    """Request ids, request metrics and the access log, around every request."""

    def __init__(self, metrics: Metrics, providers: Callable[[], Mapping[str, object]],
                 identity_of: Callable[[web.Request], str | None],
                 logger: logging.Logger = ACCESS_LOG) -> None:
        self._metrics = metrics
        self._providers = providers
        self._identity_of = identity_of
        self._log = logger

    @staticmethod
    def request_id(request: web.Request) -> str | None:
        return request.get(REQUEST_ID)

    def upstream_answered(self, request: web.Request, provider: str, status: int,
                          seconds: float) -> None:
        """``ProxyHandler(on_upstream=...)``: the upstream's response headers arrived."""
        request[UPSTREAM_STATUS] = status
        try:
            self._metrics.upstream_answered(provider, seconds)
        except Exception:  # metrics must never fail a request
            logging.getLogger("gateway").exception("recording upstream metrics failed")

    async def on_response_prepare(self, request: web.Request,
                                  response: web.StreamResponse) -> None:
        """Echo the request id on the gateway's own answers (upstream ones pass unchanged)."""
        rid = request.get(REQUEST_ID)
        if rid and (request.path.startswith("/_gateway/") or "Gateway-Error" in response.headers):
            response.headers.setdefault("X-Request-Id", rid)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        given = request.headers.get("X-Request-Id", "")
        request[REQUEST_ID] = given if _REQUEST_ID_OK.fullmatch(given) else uuid.uuid4().hex
        self._metrics.in_flight.inc()
        status, response = 500, None
        try:
            response = await handler(request)
            status = response.status
            if not response.prepared and type(response) is web.Response:
                # Send it here, so the line reports the whole exchange: time and bytes. (Only
                # plain responses: a FileResponse's prepare is not idempotent.)
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionError:
                    status = 499
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:  # the client went away (nginx's 499)
            status = 499
            raise
        finally:
            self._metrics.in_flight.dec()
            self._done(request, response, status, time.perf_counter() - start)

    def _done(self, request: web.Request, response: web.StreamResponse | None, status: int,
              seconds: float) -> None:
        path = request.raw_path.partition("?")[0]
        providers = self._providers()
        if path.startswith("/_gateway/") or path == "/_gateway":
            name = request.match_info.get("provider")
            provider = name if name in providers else None
            label = GATEWAY_LABEL
        else:
            first = path[1:].partition("/")[0]
            provider = first if first in providers else None
            label = self._metrics.provider_label(provider)
        identity = self._identity_of(request)
        try:
            self._metrics.request_done(label, request.method, status, seconds, identity)
        except Exception:  # metrics must never fail a request
            logging.getLogger("gateway").exception("recording request metrics failed")
        fields = {
            "request_id": request.get(REQUEST_ID), "remote": request.remote,
            "method": request.method, "path": path[:1024], "status": status,
            "provider": provider, "identity": identity,
            "upstream_status": request.get(UPSTREAM_STATUS),
            "error": response.headers.get("Gateway-Error") if response is not None else None,
            "duration_ms": round(seconds * 1000, 3),
            "bytes_in": request.content.total_bytes,
            "bytes_out": _bytes_out(response),
        }
        level = logging.DEBUG if path in _PROBES else logging.INFO
        self._log.log(level, "request", extra={"fields": fields})


def _bytes_out(response: web.StreamResponse | None) -> int | None:
    """Bytes written to the connection for the response: status line, headers and body."""
    if response is None or not response.prepared:
        return None
    return response.body_length
