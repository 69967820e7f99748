"""Request-target routing: ``/<provider>/<path>?<query>`` to ``<upstream>/<path>?<query>``.

Pure functions over the *raw* request target (``request.raw_path``), never the decoded path:
the path and query go upstream byte for byte (SPEC invariant 3), so nothing here decodes and
re-encodes. Decoding happens only on a throw-away copy, to decide whether the remainder is
safe (invariant 2):

* The result always has the upstream's scheme and authority, and its path is the upstream
  base path followed by the remainder, so the request cannot reach another host.
* A remainder is rejected when any reading of it, by any upstream we can imagine, contains a
  ``.`` or ``..`` segment: we percent-decode repeatedly (double encoding), also decode
  ``%uXXXX``, treat ``\\`` as ``/``, cut ``;params`` off a segment (``..;/`` on Tomcat),
  apply NFKC (fullwidth dots), and look for overlong UTF-8 dots and slashes. ``%2F`` itself is
  forwarded unchanged; it only matters if decoding it would form a dot-segment, which the
  same check catches.
* Control characters (decoded or not) in the path, raw ones in the query, and fragments are
  rejected.

A provider may have several API bases (:func:`choose_upstream`): ``upstreams`` names them, and
``/<provider>/<name>/<rest>`` goes to ``upstreams[name]/<rest>``; any other path goes to the
default base, which is ``upstream`` or, for a provider with ``upstream_from_token``
(Salesforce's ``instance_url``), the base its token response named. Every base is one the
configuration allowlists: a request never chooses a host, it only picks among these.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit

from yarl import URL

from gateway.config import ProviderConfig
from gateway.errors import BadRequest, UnknownUpstream

__all__ = ["Target", "UnknownUpstream", "UpstreamChoice", "base_url", "check_path",
           "choose_upstream", "parse_target", "rewrite_location", "upstream_url"]

_MAX_DECODE_ROUNDS = 8
_PCT_U = re.compile(r"%[uU]([0-9A-Fa-f]{4})")
_RAW_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_DECODED_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Overlong UTF-8 forms of '.', '/' and '\\' (and any other overlong sequence): never valid,
# but some decoders have mapped them to the ASCII character.
_OVERLONG = re.compile(rb"[\xc0\xc1]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed origin-form request target, still in raw (encoded) form."""

    provider: str
    path: str  # "" or starts with "/"; appended to the upstream base path
    query: str | None  # None: no '?' at all; "": a bare '?'


def parse_target(raw: str) -> Target:
    """Split ``/<provider>[/<path>][?<query>]``; raise BadRequest for anything unsafe.

    ``raw`` is the request target exactly as received. Absolute-form (``http://...``),
    authority-form and asterisk-form targets are refused: the gateway is not a forward proxy.
    """
    if not raw.startswith("/") or raw.startswith("//"):
        raise BadRequest("The request target must be a path starting with /<provider>/.")
    if "#" in raw:
        raise BadRequest("The request target must not contain a fragment.")
    if _RAW_CONTROL.search(raw):
        raise BadRequest("The request target contains control characters or spaces.")
    path, sep, query = raw.partition("?")
    check_path(path)
    provider, slash, rest = path[1:].partition("/")
    remainder = slash + rest
    return Target(provider=provider, path=remainder, query=query if sep else None)


@dataclass(frozen=True, slots=True)
class UpstreamChoice:
    """Which of a provider's bases a request goes to, and what goes below it."""

    name: str | None  # the ``upstreams`` entry; None: the default base
    target: Target  # the remainder under that base (raw, as received)
    prefix: str  # the gateway path mapped onto the base: /<provider> or /<provider>/<name>


def choose_upstream(provider: ProviderConfig, target: Target) -> UpstreamChoice:
    """A first path segment equal to an ``upstreams`` name picks that base; anything else
    goes to the default base, or raises :class:`UnknownUpstream` when there is none.

    The segment is compared as received: an encoded name (``gm%61il``) names nothing and so
    goes to the default base, like any other path there.
    """
    first, slash, rest = target.path[1:].partition("/")
    if target.path.startswith("/") and first in provider.upstreams:
        below = Target(provider=target.provider, path=slash + rest, query=target.query)
        return UpstreamChoice(first, below, f"/{target.provider}/{first}")
    if provider.upstream is None and provider.upstream_from_token is None:
        names = sorted(provider.upstreams)
        raise UnknownUpstream(
            f"Provider {target.provider!r} has no API named {first!r}; paths start with one "
            f"of: {', '.join(names) or '(none configured)'}.",
            provider=target.provider, upstreams=names)
    return UpstreamChoice(None, target, f"/{target.provider}")


def base_url(provider: ProviderConfig, choice: UpstreamChoice,
             token_base: URL | None) -> URL | None:
    """The base URL for ``choice``: the named entry; else, for a provider with
    ``upstream_from_token`` only, the base its token response named (``token_base``, as the
    token manager vetted it); else ``upstream``. None when there is none."""
    if choice.name is not None:
        return provider.upstreams[choice.name]
    if provider.upstream_from_token is not None and token_base is not None:
        return token_base
    return provider.upstream


def check_path(path: str) -> None:
    """Raise BadRequest if any decoding of ``path`` could leave the base path."""
    seen = path
    for _ in range(_MAX_DECODE_ROUNDS):
        _check_segments(seen)
        raw = unquote_to_bytes(_PCT_U.sub(_utf8_escape, seen).encode("utf-8", "surrogateescape"))
        if _OVERLONG.search(raw):
            raise BadRequest("The request path contains an overlong UTF-8 sequence.")
        decoded = raw.decode("utf-8", "surrogateescape")
        if _DECODED_CONTROL.search(decoded):
            raise BadRequest("The request path contains control characters.")
        if decoded == seen:
            return
        seen = decoded
    raise BadRequest("The request path is encoded too many times.")


def _utf8_escape(m: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in chr(int(m.group(1), 16)).encode("utf-8", "surrogatepass"))


def _check_segments(path: str) -> None:
    for form in {path, unicodedata.normalize("NFKC", path)}:
        for segment in form.replace("\\", "/").split("/"):
            name = segment.split(";", 1)[0].strip()
            if name and name.strip(".") == "":
                raise BadRequest("The request path must not contain '.' or '..' segments.")


def upstream_url(base: URL, target: Target) -> URL:
    """The upstream URL: ``base`` (scheme, authority, path prefix) plus the raw remainder.

    The base's own query, if any, is not used. yarl cannot hold a present-but-empty query,
    so a bare ``?`` rides at the end of the raw path, keeping the request line byte-exact.
    """
    prefix = base.raw_path.rstrip("/")
    path = prefix + target.path if target.path else (base.raw_path or "/")
    if target.query == "":
        path += "?"
    return URL.build(scheme=base.scheme, authority=base.raw_authority, path=path,
                     query_string=target.query or "", encoded=True)


def rewrite_location(location: str, upstream_base: URL, gateway_prefix: URL) -> str:
    """Map a Location under the upstream base onto the gateway prefix; else return it as is.

    Absolute URLs keep their absolute form (with the gateway's origin); an absolute path stays
    a path. Relative references are left alone: the client resolves them against the gateway
    URL it asked for, which is already under the prefix.
    """
    try:
        parts = urlsplit(location)
    except ValueError:
        return location
    if parts.scheme or parts.netloc:
        scheme = (parts.scheme or upstream_base.scheme).lower()
        try:
            port = parts.port
        except ValueError:
            return location
        if (scheme != upstream_base.scheme
                or (parts.hostname or "") != (upstream_base.raw_host or "").lower()
                or (port or _DEFAULT_PORTS.get(scheme)) != upstream_base.port
                or parts.username is not None):
            return location
        absolute = True
    elif location.startswith("/"):
        absolute = False
    else:
        return location
    base_path = upstream_base.raw_path.rstrip("/")
    path = parts.path or "/"
    if not (path == base_path or path.startswith(base_path + "/")):
        return location
    rest = path[len(base_path):]
    new = gateway_prefix.raw_path.rstrip("/") + rest
    if parts.query or location.split("#", 1)[0].endswith("?"):
        new += "?" + parts.query
    if parts.fragment:
        new += "#" + parts.fragment
    if absolute:
        return f"{gateway_prefix.scheme}://{gateway_prefix.raw_authority}{new}"
    return new
