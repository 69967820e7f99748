"""The built-in provider catalog: presets as data, one YAML file per provider.

A preset holds what every client of a provider would otherwise copy from its documentation:
endpoints, client authentication, scope syntax, PKCE support, extra authorize parameters,
token quirks, revocation and API base URL(s). It uses the keys of a ``providers.<name>``
config entry, plus three of its own: ``title``, ``docs`` (the public pages the values come
from) and ``vars`` (URL template variables with their defaults; ``null`` means the user must
set one). The config loader (:func:`gateway.config._provider`) merges a preset under the
user's keys, so ``preset`` + ``client_id`` + ``client_secret`` is a complete provider.

Templates: ``{name}`` in a preset string is filled from ``providers.<p>.vars``, else the
preset's default. A placeholder that opens a URL value (``{base_url}/oauth/token``) takes an
absolute http(s) URL; anywhere else it takes one path or host segment (RFC 3986 unreserved
characters), so a variable can never add a path, query or userinfo to an endpoint.

Quirks (:data:`QUIRKS`) are named options for the ways providers depart from RFC 6749. Each
default is the standard behaviour; only :mod:`gateway.oauth.protocol` and the proxy act on
them. This module only declares, validates and documents them.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from yarl import URL

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import ProviderConfig, _Section

CATALOG_DIR = Path(__file__).with_name("catalog")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")
_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]+$")  # RFC 3986 §2.3 unreserved
_FIELD = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a token-response member name
_SCHEME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,32}$")  # RFC 9110 §11.1 auth-scheme
_UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,62}$")

# Keys a preset may set: those of a provider entry (less the per-deployment ones) plus its own.
PROVIDER_KEYS = frozenset({
    "issuer", "authorize_url", "token_url", "revocation_url", "jwks_url", "upstream",
    "upstreams", "client_auth", "grant", "scopes", "required_scopes", "scope_separator", "pkce",
    "authorize_params", "token_params",
})
PRESET_ONLY_KEYS = frozenset({"title", "docs", "vars"})
# Keys whose values are URLs: there a template may open with a base URL variable.
_URL_KEYS = frozenset({"issuer", "authorize_url", "token_url", "revocation_url", "jwks_url",
                       "upstream", "upstreams"})


# --------------------------------------------------------------------------- quirks


@dataclass(frozen=True, slots=True)
class Quirk:
    """One named departure from RFC 6749; ``default`` is the standard behaviour."""

    key: str
    default: Any
    doc: str
    choices: tuple[str, ...] = ()  # for enumerations
    pattern: re.Pattern[str] | None = None  # for names


QUIRKS: tuple[Quirk, ...] = (
    Quirk("scope_param", "scope", pattern=_FIELD, doc=(
        "authorize parameter carrying the scopes (RFC 6749 §3.3 says `scope`; Slack puts a "
        "user token's scopes in `user_scope`)")),
    Quirk("token_request_format", "form", choices=("form", "json"), doc=(
        "body of token and revocation requests: `form` (RFC 6749 §4.1.3, RFC 7009 §2.1) or "
        "`json` (Notion documents JSON bodies)")),
    Quirk("token_response_format", "json", choices=("json", "form", "auto"), doc=(
        "body of token responses: `json` (RFC 6749 §5.1), `form` or `auto` (by Content-Type; "
        "GitHub answers form-encoded unless the request says Accept: application/json, "
        "which the gateway always does)")),
    Quirk("token_response_path", (), doc=(
        "dotted path to the object holding the token fields in a code-exchange response "
        "(Slack user tokens sit under `authed_user`); when the path is absent, as in Slack's "
        "refresh responses, the top level is used")),
    Quirk("upstream_from_token", None, pattern=_FIELD, doc=(
        "token response member giving this connection's API base URL, used instead of "
        "`upstream` (Salesforce: `instance_url`); it must be an absolute https URL")),
    Quirk("expires_absolute_field", None, pattern=_FIELD, doc=(
        "token response member with the absolute expiry in Unix seconds, preferred over "
        "`expires_in` (Strava: `expires_at`)")),
    Quirk("never_expires", False, doc=(
        "a token response without `expires_in` means the access token is used until the "
        "upstream answers 401, instead of assuming a default lifetime (GitHub OAuth apps, "
        "Salesforce sessions)")),
    Quirk("revocation_method", "rfc7009", choices=("rfc7009", "bearer", "access_token_param"),
          doc=("`rfc7009`: POST token=... with client authentication (RFC 7009 §2.1); "
               "`bearer`: POST with the access token as Bearer credentials and no body "
               "(Dropbox, Slack); `access_token_param`: POST access_token=... (Strava)")),
    Quirk("upstream_auth_scheme", "Bearer", pattern=_SCHEME, doc=(
        "Authorization scheme on upstream requests (RFC 6750 §2.1 says Bearer; SoundCloud "
        "requires `OAuth`)")),
)
QUIRK_KEYS = frozenset(q.key for q in QUIRKS)


def read_quirks(src: Callable[[str], _Section]) -> dict[str, Any]:
    """Validated quirk values as ``ProviderConfig`` keyword arguments.

    ``src(key)`` is the section the key is read from (the config entry, else the preset), so
    an error names the key where the bad value was written.
    """
    out: dict[str, Any] = {}
    for q in QUIRKS:
        sec = src(q.key)
        if isinstance(q.default, bool):
            out[q.key] = sec.flag(q.key, q.default)
        elif q.key == "token_response_path":
            out[q.key] = _dotted_path(sec.raw(q.key), sec.key(q.key))
        else:
            value = sec.text(q.key, q.default)
            if value is None:
                out[q.key] = None
            elif q.choices and value not in q.choices:
                raise ConfigError(sec.key(q.key), f"must be one of {', '.join(q.choices)}")
            elif q.pattern is not None and not q.pattern.match(value):
                raise ConfigError(sec.key(q.key), "must be a single name (letters, digits, "
                                  "'_', '.', '-')")
            else:
                out[q.key] = value
    if out["scope_param"] in ("response_type", "client_id", "redirect_uri", "state",
                              "code_challenge", "code_challenge_method", "nonce"):
        raise ConfigError(src("scope_param").key("scope_param"),
                          "must not name a parameter the protocol sets itself")
    return out


def _dotted_path(value: Any, path: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    parts = value.split(".") if isinstance(value, str) else value
    if not isinstance(parts, list | tuple) or not all(
            isinstance(p, str) and _FIELD.match(p) and "." not in p for p in parts):
        raise ConfigError(path, "must be a member name or a dotted path such as authed_user")
    return tuple(parts)


def parse_upstream(name: str, value: str, path: str) -> URL:
    """One ``upstreams`` entry: its name becomes a path segment, its value a base URL."""
    from gateway.config import parse_http_url

    if not _UPSTREAM_NAME.match(name):
        raise ConfigError(path, "upstream names are one path segment (letters, digits, "
                          "'.', '_', '~', '-')")
    url = parse_http_url(value, path)
    if url.query_string:
        raise ConfigError(path, "must not contain a query")
    return url


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True, slots=True)
class FilledPreset:
    """A preset with its templates filled. ``unfilled`` maps each key whose template lacks
    a variable (``token_url``, or ``authorize_params.x`` for a map entry) to the variables
    it needs; those keys are left out of ``values``."""

    values: Mapping[str, Any] = field(default_factory=dict)
    vars: Mapping[str, str] = field(default_factory=dict)
    unfilled: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def fill_preset(preset: Mapping[str, Any], given: Mapping[str, str], path: str) -> FilledPreset:
    """Fill ``{var}`` templates from ``given`` (``providers.<p>.vars``), else the defaults."""
    declared = preset.get("vars") or {}
    for name in given:
        if name not in declared:
            takes = ", ".join(sorted(declared)) or "no variables"
            raise ConfigError(f"{path}.{name}", f"unknown variable; this preset takes {takes}")
    # An empty value (say, from an unset ${VAR}) means "not given": the default applies.
    chosen = {**declared, **{k: v for k, v in given.items() if v != ""}}
    known = {k: str(v) for k, v in chosen.items() if v not in (None, "")}

    def fill(text: str, url: bool) -> str | tuple[str, ...]:
        lacking = tuple(n for n in _PLACEHOLDER.findall(text) if n not in known)
        if lacking:
            return lacking

        def sub(m: re.Match[str]) -> str:
            value, where = known[m.group(1)], f"{path}.{m.group(1)}"
            if url and m.start() == 0:
                return _base_url(value, where)
            if not _SEGMENT.match(value):
                raise ConfigError(where, "must be one name or path segment (letters, digits, "
                                  "'.', '_', '~', '-')")
            return value

        return _PLACEHOLDER.sub(sub, text)

    values: dict[str, Any] = {}
    unfilled: dict[str, tuple[str, ...]] = {}
    for key, value in preset.items():
        if key in PRESET_ONLY_KEYS:
            continue
        url = key in _URL_KEYS
        if isinstance(value, str):
            done = fill(value, url)
            if isinstance(done, tuple):
                unfilled[key] = done
            else:
                values[key] = done
        elif isinstance(value, dict):
            entries: dict[str, Any] = {}
            for sub_key, sub_value in value.items():
                done = fill(sub_value, url) if isinstance(sub_value, str) else sub_value
                if isinstance(done, tuple):
                    unfilled[f"{key}.{sub_key}"] = done
                else:
                    entries[sub_key] = done
            values[key] = entries
        elif isinstance(value, list):
            items = [fill(v, url) if isinstance(v, str) else v for v in value]
            lacking = tuple(n for i in items if isinstance(i, tuple) for n in i)
            if lacking:
                unfilled[key] = lacking
            else:
                values[key] = items
        else:
            values[key] = value
    used = {k: v for k, v in known.items() if k in declared}
    return FilledPreset(values=values, vars=used, unfilled=unfilled)


def _base_url(value: str, path: str) -> str:
    from gateway.config import parse_http_url

    url = parse_http_url(value, path)
    if url.query_string:
        raise ConfigError(path, "must be a base URL without query")
    return value.rstrip("/")


# --------------------------------------------------------------------------- presets


def list_presets() -> list[str]:
    """Names of the built-in presets, sorted."""
    return sorted(p.stem for p in CATALOG_DIR.glob("*.yaml") if _NAME.match(p.stem))


def load_preset(name: str) -> Mapping[str, Any] | None:
    """The preset called ``name`` as a fresh mapping, or ``None`` when there is none."""
    if not _NAME.match(name) or name not in list_presets():
        return None
    return copy.deepcopy(_read_preset(name))


@functools.cache
def _read_preset(name: str) -> dict[str, Any]:
    return parse_preset((CATALOG_DIR / f"{name}.yaml").read_text(encoding="utf-8"), name)


def parse_preset(text: str, name: str) -> dict[str, Any]:
    """Parse and check one preset file; a broken one is a :class:`ConfigError` naming it."""
    where = f"preset {name}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(where, "is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(where, "must be a mapping")
    for key in data:
        if key not in PROVIDER_KEYS | PRESET_ONLY_KEYS | QUIRK_KEYS:
            raise ConfigError(f"{where}.{key}", "is not a preset key")
    if not isinstance(data.get("title"), str) or not data["title"].strip():
        raise ConfigError(f"{where}.title", "is required")
    docs = data.get("docs")
    if not isinstance(docs, list) or not docs or not all(
            isinstance(d, str) and d.startswith("https://") for d in docs):
        raise ConfigError(f"{where}.docs", "must list the https:// pages the values come from")
    declared = data.get("vars") or {}
    if not isinstance(declared, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in declared.items()):
        raise ConfigError(f"{where}.vars", "must map variable names to defaults (or null)")
    for text_value in _strings(data):
        for var in _PLACEHOLDER.findall(text_value):
            if var not in declared:
                raise ConfigError(f"{where}.vars", f"does not declare {var!r}, used in "
                                  f"{text_value!r}")
    return data


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def preset_provider(name: str, vars: Mapping[str, str] | None = None) -> ProviderConfig | None:
    """The provider a config entry of just ``preset: name`` (and ``vars``) would give."""
    from gateway.config import _provider, _Section

    if load_preset(name) is None:
        return None
    entry: dict[str, Any] = {"preset": name}
    if vars:
        entry["vars"] = dict(vars)
    return _provider(name, _Section(entry, f"providers.{name}"), load_preset)


# --------------------------------------------------------------------------- describe

_MASK = "********"


def describe(provider: ProviderConfig) -> dict[str, Any]:
    """Resolved settings for ``gateway providers show``: plain values, secret masked.

    The mask has a fixed length, so not even the secret's length is shown. Quirks appear
    only when they differ from the standard behaviour.
    """

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    out: dict[str, Any] = {
        "preset": provider.preset,
        "usable": provider.usable,
        "problems": list(provider.problems),
        "client_id": provider.client_id or None,
        "client_secret": _MASK if provider.client_secret else None,
        "client_auth": provider.client_auth,
        "grant": provider.grant,
        "issuer": text(provider.issuer),
        "authorize_url": text(provider.authorize_url),
        "token_url": text(provider.token_url),
        "revocation_url": text(provider.revocation_url),
        "jwks_url": text(provider.jwks_url),
        "upstream": text(provider.upstream),
        "upstreams": {k: str(v) for k, v in provider.upstreams.items()},
        "vars": dict(provider.vars),
        "scopes": list(provider.scopes),
        "scope_separator": provider.scope_separator,
        "pkce": provider.pkce,
        "authorize_params": dict(provider.authorize_params),
        "token_params": dict(provider.token_params),
        "quirks": {q.key: _plain(getattr(provider, q.key)) for q in QUIRKS
                   if getattr(provider, q.key) != q.default},
        "sources": dict(provider.sources),
    }
    return out


def _plain(value: Any) -> Any:
    return ".".join(value) if isinstance(value, tuple) else value
