"""Configuration: YAML in, frozen dataclasses out, validated once at start.

Every problem is a :class:`~gateway.errors.ConfigError` naming the YAML key path, so the CLI
can print one sentence and exit 2. The environment is passed in as a mapping (tests give
their own); ``${VAR}`` and ``${VAR:-default}`` are replaced inside string values only, so a
secret can never change the YAML structure.

A provider whose secrets are missing is still loaded, marked ``usable=False`` with a reason:
the shipped config must start on a fresh machine, and the dashboard explains what is missing.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from gateway.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
GRANTS = ("authorization_code", "client_credentials")
# A config is a few hundred values; these bounds turn a hostile document (deep nesting,
# "billion laughs" aliases) into a ConfigError instead of a RecursionError or a hang.
MAX_DEPTH = 32
MAX_VALUES = 100_000
# Defaults of the request limits (gateway.limits), also used by the ServerConfig defaults.
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024
DEFAULT_REPLAY_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: URL = URL("http://127.0.0.1:8080")  # noqa: RUF009 (URL is immutable)
    forwarded_headers: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    replay_body_bytes: int = DEFAULT_REPLAY_BODY_BYTES
    # Request limits enforced by the HTTP parser before any handler runs (gateway.limits):
    # the request target, one header field, the number of header fields.
    max_url_bytes: int = 8190
    max_header_bytes: int = 8190
    max_headers: int = 128
    # Requests one identity may have in flight at once (0: no limit); more get 429.
    max_concurrent_per_identity: int = 256
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    pool_limit: int = 1000
    pool_limit_per_host: int = 0
    refresh_skew: float = 60.0
    token_timeout: float = 15.0
    shutdown_grace: float = 30.0

    @property
    def redirect_uri(self) -> str:
        return str(self.public_url.with_path(self.public_url.path.rstrip("/") + "/_gateway/callback"))


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str
    kind: str  # "sqlite" | "postgresql"
    path: Path | None = None  # sqlite only, absolute
    busy_timeout: float = 5.0  # sqlite only: how long a write waits for another writer


@dataclass(frozen=True, slots=True)
class ConsentConfig:
    require_login: bool = True
    link_ttl: float = 600.0
    pending_ttl: float = 600.0
    return_to_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    upstream: URL | None = None
    authorize_url: URL | None = None
    token_url: URL | None = None
    revocation_url: URL | None = None
    issuer: URL | None = None
    jwks_url: URL | None = None
    preset: str | None = None
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    client_auth: str = "client_secret_basic"
    grant: str = "authorization_code"
    # client_credentials only: the identities that may use the gateway's token (None: all).
    identities: tuple[str, ...] | None = None
    scopes: tuple[str, ...] = ()
    scope_separator: str = " "
    pkce: bool = True
    authorize_params: Mapping[str, str] = field(default_factory=dict)
    token_params: Mapping[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    # Named API bases: ``/<provider>/<name>/<path>`` goes to ``upstreams[name]/<path>``; other
    # paths go to ``upstream``. Values are absolute http(s) URLs without query.
    upstreams: Mapping[str, URL] = field(default_factory=dict)
    # Preset URL template variables as resolved (config value, else the preset's default), and
    # the ones a used template still lacks (each makes the provider not usable).
    vars: Mapping[str, str] = field(default_factory=dict)
    missing_vars: tuple[str, ...] = ()
    # Where each setting came from: "config", "preset" or "discovery" (absent: default).
    sources: Mapping[str, str] = field(default_factory=dict)
    # Discovery (gateway.oauth.discovery) ran and filled what it could, or failed with this.
    discovered: bool = False
    discovery_error: str | None = None
    # Provider quirks, declared by presets; each default means "standard behaviour". Their
    # meaning is documented in gateway/oauth/catalog.py (QUIRKS).
    scope_param: str = "scope"
    token_request_format: str = "form"  # noqa: S105 (a body format, not a secret)
    token_response_format: str = "json"  # noqa: S105
    token_response_path: tuple[str, ...] = ()
    upstream_from_token: str | None = None
    expires_absolute_field: str | None = None
    never_expires: bool = False
    revocation_method: str = "rfc7009"
    upstream_auth_scheme: str = "Bearer"

    @property
    def usable(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    server: ServerConfig
    store: StoreConfig
    consent: ConsentConfig
    providers: Mapping[str, ProviderConfig]
    encryption_key: str | None = field(default=None, repr=False)
    encryption_key_file: Path | None = None
    encryption_keys_old: tuple[str, ...] = field(default=(), repr=False)
    log_format: str = "json"
    admin: AdminConfig = field(default_factory=lambda: AdminConfig())
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig())
    rate_limit: RateLimitConfig | None = None
    audit_retention_days: float = 90.0  # 0: keep audit events forever
    auth: AuthConfig = field(default_factory=lambda: AuthConfig())


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Web login behind an SSO proxy: ``trusted_header`` names the identity, and is honoured
    only on connections from ``trusted_proxies`` (CIDRs)."""

    trusted_header: str | None = None
    trusted_proxies: tuple[str, ...] = ()


def _auth(s: _Section) -> AuthConfig:
    import ipaddress

    header = s.text("trusted_header")
    proxies = s.str_list("trusted_proxies")
    for i, cidr in enumerate(proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"{s.key('trusted_proxies')}[{i}]", "not an IP network") from None
    if header is not None:
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", header):
            raise ConfigError(s.key("trusted_header"), "not a valid header name")
        if header.lower() in ("authorization", "cookie", "proxy-authorization", "host"):
            raise ConfigError(s.key("trusted_header"), "cannot be a standard header")
        if not proxies:
            raise ConfigError(s.key("trusted_proxies"),
                              "is required with trusted_header (the proxies allowed to set it)")
    s.done()
    return AuthConfig(trusted_header=header, trusted_proxies=proxies)


# --------------------------------------------------------------------------- helpers


def interpolate(text: str, env: Mapping[str, str], path: str) -> str:
    """Replace ``${VAR}`` / ``${VAR:-default}``; an unset VAR without default becomes ''."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            return default if default is not None else ""
        return value

    return _VAR.sub(sub, text)


def _interpolate_tree(node: Any, env: Mapping[str, str], path: str,
                      budget: list[int] | None = None, depth: int = 0) -> Any:
    """A copy of ``node`` with strings interpolated; bounded in depth and size (YAML aliases
    can make a short file describe an exponential number of values)."""
    budget = [MAX_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(path, f"the document has more than {MAX_VALUES} values")
    if depth > MAX_DEPTH:
        raise ConfigError(path, f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, str):
        return interpolate(node, env, path)
    if isinstance(node, list):
        return [_interpolate_tree(v, env, f"{path}[{i}]", budget, depth + 1)
                for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env, f"{path}.{k}" if path else str(k), budget, depth + 1)
                for k, v in node.items()}
    return node


class _Section:
    """Reads one mapping, remembering which keys were consumed so leftovers are errors."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a mapping")
        for k in data:
            if not isinstance(k, str):
                raise ConfigError(path, f"key {k!r} must be a string")
        self.data: dict[str, Any] = data
        self.path = path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def raw(self, name: str) -> Any:
        self.seen.add(name)
        return self.data.get(name)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def text(self, name: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self.raw(name)
        if v is None or v == "":
            if required:
                raise ConfigError(self.key(name), "is required")
            return default
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ConfigError(self.key(name), "must be a string")
        return str(v)

    def flag(self, name: str, default: bool) -> bool:
        v = self.raw(name)
        if v is None:
            return default
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.lower() in ("true", "yes", "1")
        raise ConfigError(self.key(name), "must be true or false")

    def number(self, name: str, default: float, *, minimum: float = 0,
               maximum: float | None = None, integer: bool = False) -> Any:
        v = self.raw(name)
        if v is None:
            return default
        try:
            if isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
                raise ValueError
            n = int(v) if integer else float(v)
            if integer and isinstance(v, float) and not v.is_integer():
                raise ValueError
            if not integer and not math.isfinite(n):  # "nan", "inf" as strings
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            kind = "a whole number" if integer else "a number"
            raise ConfigError(self.key(name), f"must be {kind}") from None
        if n < minimum or (maximum is not None and n > maximum):
            hi = f" and at most {maximum:g}" if maximum is not None else ""
            raise ConfigError(self.key(name), f"must be at least {minimum:g}{hi}")
        return n

    def url(self, name: str, *, required: bool = False) -> URL | None:
        s = self.text(name, required=required)
        return None if s is None else parse_http_url(s, self.key(name))

    def str_list(self, name: str) -> tuple[str, ...]:
        v = self.raw(name)
        if v is None:
            return ()
        if isinstance(v, str):
            return tuple(v.split())
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(self.key(name), "must be a list of strings")
        return tuple(v)

    def str_map(self, name: str) -> dict[str, str]:
        v = self.raw(name)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ConfigError(self.key(name), "must be a mapping of strings")
        out: dict[str, str] = {}
        for k, x in v.items():
            if isinstance(x, bool) or not isinstance(x, str | int | float):
                raise ConfigError(f"{self.key(name)}.{k}", "must be a string")
            out[str(k)] = str(x)
        return out

    def section(self, name: str) -> _Section:
        return _Section(self.raw(name), self.key(name))

    def done(self) -> None:
        extra = [k for k in self.data if k not in self.seen]
        if extra:
            raise ConfigError(self.key(extra[0]), "unknown key")


def parse_http_url(value: str, path: str) -> URL:
    try:
        url = URL(value)
    except (ValueError, TypeError):
        raise ConfigError(path, "not an absolute http(s) URL") from None
    if url.scheme not in ("http", "https") or not url.host or url.user or url.password:
        raise ConfigError(path, "not an absolute http(s) URL")
    if url.fragment:
        raise ConfigError(path, "must not contain a #fragment")
    return url


# --------------------------------------------------------------------------- sections


def _server(s: _Section) -> ServerConfig:
    host = s.text("host", "127.0.0.1") or "127.0.0.1"
    port = s.number("port", 8080, minimum=0, maximum=65535, integer=True)
    public = s.url("public_url")
    if public is None:
        loopback = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
        public = parse_http_url(f"http://{loopback}:{port}", s.key("host"))
    if public.query_string:
        raise ConfigError(s.key("public_url"), "must not contain a query")
    cfg = ServerConfig(
        host=host,
        port=port,
        public_url=public,
        forwarded_headers=s.flag("forwarded_headers", True),
        # (literal defaults: on a slotted dataclass, ``ServerConfig.x`` is a descriptor)
        max_body_bytes=s.number("max_body_bytes", DEFAULT_MAX_BODY_BYTES, integer=True),
        replay_body_bytes=s.number("replay_body_bytes", DEFAULT_REPLAY_BODY_BYTES,
                                   integer=True),
        max_url_bytes=s.number("max_url_bytes", 8190, minimum=256, maximum=1024 * 1024,
                               integer=True),
        max_header_bytes=s.number("max_header_bytes", 8190, minimum=256, maximum=1024 * 1024,
                                  integer=True),
        max_headers=s.number("max_headers", 128, minimum=8, maximum=10_000, integer=True),
        max_concurrent_per_identity=s.number("max_concurrent_per_identity", 256,
                                             integer=True),
        connect_timeout=s.number("connect_timeout", 10.0, minimum=0.001),
        read_timeout=s.number("read_timeout", 60.0, minimum=0.001),
        pool_limit=s.number("pool_limit", 1000, integer=True),
        pool_limit_per_host=s.number("pool_limit_per_host", 0, integer=True),
        refresh_skew=s.number("refresh_skew", 60.0),
        token_timeout=s.number("token_timeout", 15.0, minimum=0.001),
        shutdown_grace=s.number("shutdown_grace", 30.0),
    )
    s.done()
    return cfg


def _store(s: _Section, base_dir: Path) -> StoreConfig:
    url = s.text("url", "sqlite:///gateway.db") or "sqlite:///gateway.db"
    busy = s.number("busy_timeout", 5.0, minimum=0, maximum=600)
    s.done()
    return replace(parse_store_url(url, base_dir, s.key("url")), busy_timeout=busy)


def parse_store_url(url: str, base_dir: Path, path: str = "store.url") -> StoreConfig:
    """``sqlite:///rel`` is relative to the config's folder; ``sqlite:////abs`` is absolute."""
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///"):]
        if not rest or rest == "/":
            raise ConfigError(path, "names no database file")
        if "\0" in rest:
            raise ConfigError(path, "the database path contains a NUL character")
        file = Path(rest) if rest.startswith("/") else (base_dir / rest)
        return StoreConfig(url=url, kind="sqlite", path=file.resolve())
    if url.startswith(("postgresql://", "postgres://")):
        return StoreConfig(url=url, kind="postgresql")
    raise ConfigError(path, "must start with sqlite:/// or postgresql://")


def _consent(s: _Section) -> ConsentConfig:
    origins = []
    for i, o in enumerate(s.str_list("return_to_origins")):
        u = parse_http_url(o, f"{s.key('return_to_origins')}[{i}]")
        origins.append(str(u.origin()))
    cfg = ConsentConfig(
        require_login=s.flag("require_login", True),
        link_ttl=s.number("link_ttl", 600.0, minimum=1, maximum=600),
        pending_ttl=s.number("pending_ttl", 600.0, minimum=1, maximum=600),
        return_to_origins=tuple(origins),
    )
    s.done()
    return cfg


PresetLoader = Callable[[str], Mapping[str, Any] | None]


def _provider(name: str, s: _Section, presets: PresetLoader) -> ProviderConfig:
    """One ``providers.<name>`` entry; explicit keys win over the preset's values.

    Preset values are read through a :class:`_Section` of their own, so they are validated
    like config values (a bad one names ``preset <name>.<key>``). ``{var}`` templates in them
    are filled from ``vars`` first (:func:`gateway.oauth.catalog.fill_preset`); a template that
    is used but cannot be filled makes the provider not usable, naming the variable to set.
    """
    from dataclasses import replace

    from gateway.oauth import catalog  # quirks and templates live with the catalog

    if not _PROVIDER_NAME.match(name) or name.startswith("_"):
        raise ConfigError(s.path, "provider names use a-z, 0-9, '-' and '_' (max 63)")
    preset_name = s.text("preset")
    given_vars = s.str_map("vars")
    filled = catalog.FilledPreset()
    if preset_name is not None:
        found = presets(preset_name)
        if found is None:
            raise ConfigError(s.key("preset"),
                              f"unknown preset {preset_name!r} (see `gateway providers`)")
        filled = catalog.fill_preset(found, given_vars, s.key("vars"))
    elif given_vars:
        raise ConfigError(s.key("vars"), "only fills a preset's URL templates; set preset too")
    ps = _Section(dict(filled.values), f"preset {preset_name}")
    missing: set[str] = set()
    sources: dict[str, str] = {}

    def src(key: str) -> _Section:
        """The section ``key`` is read from: the config when it sets it, else the preset."""
        s.seen.add(key)  # an explicit null means "the preset's value, or the default"
        if s.has(key):
            sources[key] = "config"
            return s
        missing.update(filled.unfilled.get(key, ()))
        if ps.has(key):
            sources[key] = "preset"
        return ps

    def merged(key: str) -> dict[str, str]:
        """A string map: the preset's entries, each overridable by the config's."""
        own = s.str_map(key)
        for entry, lacking in filled.unfilled.items():
            if entry.startswith(f"{key}.") and entry[len(key) + 1:] not in own:
                missing.update(lacking)
        out = {**ps.str_map(key), **own}
        if out:
            sources[key] = "config" if own else "preset"
        return out

    upstreams: dict[str, URL] = {}
    for up_name, up_url in merged("upstreams").items():
        upstreams[up_name] = catalog.parse_upstream(up_name, up_url,
                                                    s.key(f"upstreams.{up_name}"))
    client_auth = src("client_auth").text("client_auth", "client_secret_basic") or ""
    if client_auth not in CLIENT_AUTH_METHODS:
        raise ConfigError(s.key("client_auth"), f"must be one of {', '.join(CLIENT_AUTH_METHODS)}")
    grant = src("grant").text("grant", "authorization_code") or ""
    if grant not in GRANTS:
        raise ConfigError(s.key("grant"), f"must be one of {', '.join(GRANTS)}")
    identities = _identities(s, grant)
    scopes = list(src("scopes").str_list("scopes"))
    # Scopes the provider needs for the gateway to work (e.g. offline_access for a refresh
    # token) are added to whatever scopes are configured; `required_scopes: []` opts out.
    scopes += [x for x in src("required_scopes").str_list("required_scopes") if x not in scopes]
    cfg = ProviderConfig(
        name=name,
        preset=preset_name,
        issuer=src("issuer").url("issuer"),
        upstream=src("upstream").url("upstream"),
        upstreams=upstreams,
        authorize_url=src("authorize_url").url("authorize_url"),
        token_url=src("token_url").url("token_url"),
        revocation_url=src("revocation_url").url("revocation_url"),
        jwks_url=src("jwks_url").url("jwks_url"),
        client_id=s.text("client_id", "") or "",
        client_secret=s.text("client_secret", "") or "",
        client_auth=client_auth,
        grant=grant,
        identities=identities,
        scopes=tuple(scopes),
        scope_separator=src("scope_separator").text("scope_separator", " ") or " ",
        pkce=src("pkce").flag("pkce", True),
        authorize_params=merged("authorize_params"),
        token_params=merged("token_params"),
        vars=filled.vars,
        **catalog.read_quirks(src),
    )
    s.done()
    return with_problems(replace(cfg, missing_vars=tuple(sorted(missing)), sources=sources))


def _identities(s: _Section, grant: str) -> tuple[str, ...] | None:
    """``identities``: who may use a client_credentials provider's token (absent: everyone).

    Only for that grant: an authorization_code connection already belongs to the identity
    that consented, so a list there would restrict nothing."""
    if not s.has("identities"):
        s.raw("identities")
        return None
    if grant != "client_credentials":
        raise ConfigError(s.key("identities"), "only applies to grant: client_credentials")
    from gateway.identities import NAME_PATTERN

    names = s.str_list("identities")
    if not names:
        raise ConfigError(s.key("identities"), "must name at least one identity (leave it "
                          "out to let every identity use the provider)")
    for i, name in enumerate(names):
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"{s.key('identities')}[{i}]", f"{name!r} is not an identity name")
    return tuple(dict.fromkeys(names))


def with_problems(cfg: ProviderConfig) -> ProviderConfig:
    """Recompute why a provider cannot be used yet (missing secrets, endpoints or variables).

    An ``issuer`` stands in for missing endpoints until discovery has run; once it has, an
    endpoint the document lacked is a problem of its own, and so is a failed discovery.
    """
    from dataclasses import replace

    problems = [f"set providers.{cfg.name}.vars.{var} (the preset's URLs need it)"
                for var in cfg.missing_vars]
    # Endpoints a preset template could not fill are a consequence of the missing variable,
    # not problems of their own: name only the variable to set.
    endpoints_pending = bool(cfg.missing_vars) or (cfg.issuer is not None and not cfg.discovered)
    if cfg.discovery_error is not None:
        problems.append(cfg.discovery_error)
    if (cfg.upstream is None and not cfg.upstreams and cfg.upstream_from_token is None
            and not cfg.missing_vars):
        problems.append("no upstream URL")
    wanted = [("token_url", "token_endpoint", True),
              ("authorize_url", "authorization_endpoint", cfg.grant == "authorization_code")]
    for attr, member, needed in wanted:
        if not needed or getattr(cfg, attr) is not None or endpoints_pending:
            continue
        if cfg.issuer is None:
            problems.append(f"no {attr} (or issuer for discovery)")
        elif cfg.discovery_error is None:
            problems.append(f"no {attr} (the discovery document has no {member})")
    if not cfg.client_id:
        problems.append("client_id is not set")
    if cfg.client_auth != "none" and not cfg.client_secret:
        problems.append("client_secret is not set")
    return replace(cfg, problems=tuple(problems))


def _no_presets(name: str) -> Mapping[str, Any] | None:
    """The built-in preset loader (the name is historical: tests pass their own loader)."""
    from gateway.oauth import catalog

    return catalog.load_preset(name)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None,
                presets: PresetLoader | None = None) -> Config:
    """Read, interpolate and validate a config file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file {file} not found") from None
    except OSError as e:
        raise ConfigError("", f"cannot read config file {file}: {e.strerror}") from None
    return parse_config(text, file, os.environ if env is None else env, presets or _no_presets)


def parse_config(text: str, source: Path, env: Mapping[str, str],
                 presets: PresetLoader = _no_presets) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"{source}: not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError("", f"{source}: nested more than {MAX_DEPTH} levels deep") from None
    if data is None:
        data = {}
    data = _interpolate_tree(data, env, "")
    root = _Section(data, "")
    base_dir = source.resolve().parent
    server = _server(root.section("server"))
    store = _store(root.section("store"), base_dir)
    consent = _consent(root.section("consent"))
    key = root.text("encryption_key")
    key_file_s = root.text("encryption_key_file")
    old_keys = root.str_list("encryption_keys_old")
    if key and key_file_s:
        raise ConfigError("encryption_key_file", "set either encryption_key or encryption_key_file, not both")
    if not key and not key_file_s:
        raise ConfigError("encryption_key", "is required (or encryption_key_file); "
                          "create one with `gateway keygen`")
    key_file = None
    if key_file_s:
        if "\0" in key_file_s:
            raise ConfigError("encryption_key_file", "contains a NUL character")
        p = Path(key_file_s)
        key_file = p if p.is_absolute() else (base_dir / p)
    log_format = root.text("log_format", "json") or "json"
    if log_format not in ("json", "logfmt"):
        raise ConfigError("log_format", "must be json or logfmt")
    provs = root.section("providers")
    providers: dict[str, ProviderConfig] = {}
    for name in list(provs.data):
        providers[name] = _provider(name, provs.section(name), presets)
    provs.done()
    admin, metrics, rate_limit, retention = _operations(root)
    auth = _auth(root.section("auth"))
    root.done()
    return Config(source=source.resolve(), server=server, store=store, consent=consent,
                  providers=providers, encryption_key=key, encryption_key_file=key_file,
                  encryption_keys_old=old_keys, log_format=log_format, admin=admin,
                  metrics=metrics, rate_limit=rate_limit, audit_retention_days=retention,
                  auth=auth)


# --------------------------------------------------------------------------- operations
# (docs/operations.md: the admin API, metrics labels, per-identity rate limits, audit)

MIN_ADMIN_KEY = 24


@dataclass(frozen=True, slots=True)
class AdminConfig:
    key: str | None = field(default=None, repr=False)  # None: no admin API


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    identity_labels: bool = False


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    requests_per_second: float
    burst: int


def _operations(root: _Section) -> tuple[AdminConfig, MetricsConfig, RateLimitConfig | None,
                                         float]:
    """``admin``, ``metrics``, ``rate_limit`` and ``audit_retention_days``."""
    import math

    adm = root.section("admin")
    admin_key = adm.text("key")
    if admin_key is not None and len(admin_key) < MIN_ADMIN_KEY:
        raise ConfigError(adm.key("key"), f"must be at least {MIN_ADMIN_KEY} characters "
                          "(generate one with `gateway keygen`)")
    adm.done()
    met = root.section("metrics")
    metrics = MetricsConfig(identity_labels=met.flag("identity_labels", False))
    met.done()
    rate_limit = None
    if root.has("rate_limit"):
        rl = root.section("rate_limit")
        if not rl.has("requests_per_second"):
            raise ConfigError(rl.key("requests_per_second"), "is required")
        rps = rl.number("requests_per_second", 1.0, minimum=0.001)
        if not math.isfinite(rps):
            raise ConfigError(rl.key("requests_per_second"), "must be a finite number")
        burst = rl.number("burst", max(1, math.ceil(rps)), minimum=1, integer=True)
        rl.done()
        rate_limit = RateLimitConfig(requests_per_second=rps, burst=burst)
    else:
        root.raw("rate_limit")  # an explicit null: no limit
    retention = root.number("audit_retention_days", 90.0, minimum=0)
    return AdminConfig(key=admin_key), metrics, rate_limit, retention
