"""The ``gateway`` command line.

Exit codes are part of the contract: 0 ok, 1 runtime failure (store or provider unreachable,
server error), 2 bad usage or bad config (argparse errors, an invalid config key, an unknown or
duplicate identity, a bad name or password). Every failure is one line on stderr naming the
file, key or argument at fault, never a traceback. Arguments are validated before the store is
opened, so a command that fails on its input changes nothing stored.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from gateway import __version__
from gateway.config import Config, StoreConfig, load_config
from gateway.errors import BadRequest, ConfigError, GatewayError
from gateway.identities import IdentityService, validate_name, validate_password
from gateway.store.base import Store
from gateway.tokens.crypto import SecretBox, decode_key, generate_key

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A failure to report as one line, with the exit code it deserves."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- output helpers


def _out(line: str = "") -> None:
    print(line, flush=True)


def _warn(line: str) -> None:
    print(f"gateway: {line}", file=sys.stderr, flush=True)


def _when(ts: float | None, never: str = "-") -> str:
    if ts is None:
        return never
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    for row in (headers, *rows):
        _out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _store_where(store: StoreConfig) -> str:
    """The store, named without its password."""
    if store.kind == "sqlite":
        return f"sqlite database {store.path}"
    url = URL(store.url)
    return f"postgresql database {url.with_password(None) if url.password else url}"


# --------------------------------------------------------------------------- config & store


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("GATEWAY_CONFIG") or "config.yaml")


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args))


def _box(cfg: Config) -> Any:
    from gateway.tokens.crypto import box_from_config

    return box_from_config(cfg.encryption_key, cfg.encryption_key_file, cfg.encryption_keys_old)


@asynccontextmanager
async def open_store(cfg: Config) -> AsyncIterator[tuple[Store, Any]]:
    """The configured store, opened (migrated) and closed again; (store, box)."""
    box = _box(cfg)
    from gateway.store import create_store

    store = create_store(cfg.store, box)
    try:
        await store.open()
    except GatewayError as e:
        raise CliError(f"cannot open the {_store_where(cfg.store)}: {e.message}", EXIT_FAILURE
                       ) from None
    except Exception as e:
        raise CliError(f"cannot open the {_store_where(cfg.store)}: {_describe(e)}",
                       EXIT_FAILURE) from None
    try:
        yield store, box
    finally:
        await store.close()


async def _api_key_mac(store: Store, box: SecretBox) -> bytes:
    from gateway.keyrotation import api_key_mac

    return await api_key_mac(store, box)


def _run_with_identities(args: argparse.Namespace,
                         body: Callable[[IdentityService, Store], Any]) -> int:
    cfg = _load(args)

    async def go() -> int:
        async with open_store(cfg) as (store, box):
            service = IdentityService(store, box, mac_key=await _api_key_mac(store, box))
            result: int | None = await body(service, store)
            return EXIT_OK if result is None else result

    return asyncio.run(go())


def _read_password(args: argparse.Namespace, name: str) -> str:
    """From stdin (first line) with --password-stdin, else asked twice on the terminal."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("--password-stdin: standard input held no password")
    else:
        if not sys.stdin.isatty():
            raise CliError("standard input is not a terminal; pass the password with "
                           "--password-stdin")
        password = getpass.getpass(f"New password for {name}: ")
        if getpass.getpass("Repeat it: ") != password:
            raise CliError("the two passwords differ; nothing was changed")
    try:
        return validate_password(password)
    except BadRequest as e:
        raise CliError(f"password: {e.message}") from None


# --------------------------------------------------------------------------- commands


def cmd_keygen(args: argparse.Namespace) -> int:
    _out(generate_key())
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    server = cfg.server
    if args.host is not None or args.port is not None:
        host = args.host if args.host is not None else server.host
        port = args.port if args.port is not None else server.port
        public = server.public_url
        if public == _default_public(server.host, server.port):  # derived, so follow along
            public = _default_public(host, port)
        cfg = replace(cfg, server=replace(server, host=host, port=port, public_url=public))
    _box(cfg)  # a bad key is a config error (exit 2) before any worker starts
    try:
        from gateway.app import run
    except ImportError:
        raise CliError("this installation has no server (gateway.app is missing)",
                       EXIT_FAILURE) from None
    run(cfg, workers=args.workers, pidfile=getattr(args, "pidfile", None))
    return EXIT_OK


def _default_public(host: str, port: int) -> URL:
    return URL(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}")  # noqa: S104


def _check_key(cfg: Config) -> str:
    """Validate the encryption key(s) without creating a key file."""
    for i, old in enumerate(cfg.encryption_keys_old):
        decode_key(old, f"encryption_keys_old[{i}]")
    if cfg.encryption_key:
        decode_key(cfg.encryption_key, "encryption_key")
        return "encryption_key (set)"
    path = cfg.encryption_key_file
    assert path is not None  # the config loader requires one of the two
    where = f"encryption_key_file ({path})"
    try:
        decode_key(path.read_text(encoding="ascii"), where)
    except FileNotFoundError:
        return f"{path} (created with mode 0600 on first start)"
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(where, f"cannot be read: {_describe(e)}") from None
    return str(path)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    key = _check_key(cfg)
    _out(f"config:     {cfg.source} is valid")
    _out(f"server:     listens on {cfg.server.host}:{cfg.server.port}, "
         f"public URL {cfg.server.public_url}")
    _out(f"redirect:   {cfg.server.redirect_uri}")
    _out(f"store:      {_store_where(cfg.store)}")
    _out(f"key:        {key}")
    _out(f"consent:    require_login={'true' if cfg.consent.require_login else 'false'}")
    _out(f"providers:  {len(cfg.providers)} configured, "
         f"{sum(p.usable for p in cfg.providers.values())} usable")
    rows = [[name, "usable" if p.usable else "not usable: " + "; ".join(p.problems)]
            for name, p in cfg.providers.items()]
    if rows:
        _table(["  PROVIDER", "STATUS"], [["  " + r[0], r[1]] for r in rows])
    if not args.online:
        return EXIT_OK
    return asyncio.run(_check_online(cfg))


async def _check_online(cfg: Config) -> int:
    """Fetch discovery documents for providers with an ``issuer``; 1 if any fails."""
    with_issuer = [p for p in cfg.providers.values() if p.issuer is not None]
    if not with_issuer:
        _out("online:     no provider uses an issuer; nothing to discover")
        return EXIT_OK
    try:
        from gateway.oauth import discovery  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        discovery = None  # type: ignore[assignment]
    check = getattr(discovery, "check", None)
    if check is None:
        _out("online:     discovery unavailable in this installation")
        return EXIT_OK
    failed = 0
    for provider in with_issuer:
        try:
            await check(provider, timeout=cfg.server.token_timeout)
        except GatewayError as e:
            failed += 1
            _warn(f"providers.{provider.name}.issuer: discovery failed: {e.message}")
        else:
            _out(f"online:     {provider.name}: discovery document OK")
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_identity_add(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)
    password = _read_password(args, name) if args.password_stdin else None

    async def body(service: IdentityService, store: Store) -> None:
        identity, key = await service.add_identity(name, password)
        _out(f"Created identity '{identity.name}'"
             f"{' with a password' if password else ' (no password: web login disabled)'}.")
        _out("Its API key follows; it is shown only this once:")
        _out(key)

    return _run_with_identities(args, body)


def cmd_identity_list(args: argparse.Namespace) -> int:
    async def body(service: IdentityService, store: Store) -> None:
        rows = []
        for identity in await service.list_identities():
            keys = await store.list_api_keys(identity.id)
            active = sum(k.revoked_at is None for k in keys)
            rows.append([identity.name, "yes" if identity.password_hash else "no",
                         str(active), _when(identity.created_at)])
        _table(["NAME", "PASSWORD", "KEYS", "CREATED"], rows)

    return _run_with_identities(args, body)


def cmd_identity_remove(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)

    async def body(service: IdentityService, store: Store) -> None:
        identity = await service.get_identity(name)
        if identity is None:
            raise BadRequest(f"identity '{name}' does not exist")
        connections = await store.list_connections(identity.id)
        await service.remove_identity(name)
        _out(f"Removed identity '{name}' with its keys, sessions and connections.")
        if connections:
            providers = ", ".join(sorted(c.provider for c in connections))
            _warn(f"note: the grants at {providers} were forgotten, not revoked at the "
                  "provider (use `gateway connections revoke` for that)")

    return _run_with_identities(args, body)


def cmd_identity_passwd(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)
    cfg = _load(args)  # fail on a bad config before asking for a password

    async def go() -> int:
        async with open_store(cfg) as (store, box):
            service = IdentityService(store, box, mac_key=await _api_key_mac(store, box))
            if await service.get_identity(name) is None:
                raise BadRequest(f"identity '{name}' does not exist")
            await service.set_password(name, _read_password(args, name))
            _out(f"Password of '{name}' changed.")
            return EXIT_OK

    return asyncio.run(go())


def cmd_key_add(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)

    async def body(service: IdentityService, store: Store) -> None:
        key = await service.add_key(name)
        _out(f"New API key for '{name}' (shown only this once):")
        _out(key)

    return _run_with_identities(args, body)


def cmd_key_revoke(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)

    async def body(service: IdentityService, store: Store) -> None:
        await service.revoke_key(name, args.prefix)
        _out(f"Revoked key {args.prefix[:12]} of '{name}'.")

    return _run_with_identities(args, body)


def cmd_key_list(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)

    async def body(service: IdentityService, store: Store) -> None:
        rows = [[k.prefix, "revoked " + _when(k.revoked_at) if k.revoked_at else "active",
                 _when(k.created_at), _when(k.last_used_at, "never")]
                for k in await service.list_keys(name)]
        _table(["PREFIX", "STATUS", "CREATED", "LAST USED"], rows)

    return _run_with_identities(args, body)


def cmd_connections_list(args: argparse.Namespace) -> int:
    wanted = _valid_name(args.identity) if args.identity is not None else None

    async def body(service: IdentityService, store: Store) -> None:
        names = {i.id: i.name for i in await service.list_identities()}
        identity_id = None
        if wanted is not None:
            identity = await service.get_identity(wanted)
            if identity is None:
                raise BadRequest(f"--identity: identity '{wanted}' does not exist")
            identity_id = identity.id
        rows = []
        for c in await store.list_connections(identity_id):
            t = c.tokens  # shown: metadata only, never a token
            rows.append([names.get(c.identity_id, f"#{c.identity_id}"), c.provider, c.status,
                         _when(t.expires_at, "never"), " ".join(t.scopes) or "-"])
        _table(["IDENTITY", "PROVIDER", "STATUS", "EXPIRES", "SCOPES"], rows)

    return _run_with_identities(args, body)


def cmd_connections_revoke(args: argparse.Namespace) -> int:
    name = _valid_name(args.identity)
    cfg = _load(args)

    async def go() -> int:
        async with _admin_ops(cfg) as ops:
            try:
                outcome = await ops.revoke_connection(name, args.provider)
            except BadRequest as e:  # unknown identity or no such connection
                which = "PROVIDER" if "connection" in e.message else "IDENTITY"
                raise CliError(f"{which}: {e.message}") from None
            if outcome.revoked_at_provider:
                _out(f"Revoked the grant of '{name}' at '{args.provider}' and forgot its tokens.")
            else:
                _warn(f"warning: not revoked at '{args.provider}': {outcome.note}")
                _out(f"Forgot the tokens of '{name}' for '{args.provider}'.")
            return EXIT_OK

    return asyncio.run(go())


@asynccontextmanager
async def _admin_ops(cfg: Config) -> AsyncIterator[Any]:
    """The shared admin operations (gateway.admin.AdminOps) over the configured store."""
    import aiohttp

    from gateway.admin import AdminOps
    from gateway.audit import AuditLog
    from gateway.keyrotation import api_key_mac
    from gateway.oauth.client import OAuthClient

    async with open_store(cfg) as (store, box), aiohttp.ClientSession() as http:
        audit = AuditLog(store)
        identities = IdentityService(store, box, mac_key=await api_key_mac(store, box))
        yield AdminOps(store, identities, audit,
                       OAuthClient(http, timeout=cfg.server.token_timeout),
                       lambda: cfg.providers)
        await audit.flush()


def cmd_audit(args: argparse.Namespace) -> int:
    import json
    import time

    from gateway.audit import parse_since

    wanted = _valid_name(args.identity) if args.identity is not None else None
    try:
        since = parse_since(args.since, time.time()) if args.since is not None else None
    except BadRequest as e:
        raise CliError(f"--since: {e.message.removeprefix('since: ')}") from None
    cfg = _load(args)

    async def go() -> int:
        async with _admin_ops(cfg) as ops:
            events = list(reversed(await ops.audit_events(wanted, since, args.limit)))
        if args.json:
            for e in events:
                _out(json.dumps({"at": e.at, "kind": e.kind, "outcome": e.outcome,
                                 "identity": e.identity, "provider": e.provider,
                                 "detail": e.detail}))
            return EXIT_OK
        _table(["TIME", "KIND", "OUTCOME", "IDENTITY", "PROVIDER", "DETAIL"],
               [[_when(e.at), e.kind, e.outcome, e.identity or "-", e.provider or "-",
                 e.detail or ""] for e in events])
        return EXIT_OK

    return asyncio.run(go())


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Re-encrypt stored secrets under the current key, or start a rotation (see
    gateway.keyrotation)."""
    from gateway import keyrotation

    cfg = _load(args)
    request = keyrotation.Request(new_key=args.new_key, batch=args.batch, status=args.status)
    return keyrotation.run(cfg, request, _out, _warn, sys.stdin)


def cmd_reload(args: argparse.Namespace) -> int:
    from gateway.serving import default_pidfile, request_reload

    cfg = _load(args)  # a broken file is refused here already (exit 2), nothing is signalled
    path = Path(args.pidfile) if args.pidfile else default_pidfile(cfg)
    pid = request_reload(path)
    _out(f"Asked the gateway (pid {pid}) to reload {cfg.source}; its log says "
         "'config reloaded' or 'config reload refused'.")
    return EXIT_OK


def _catalog() -> tuple[Callable[[], list[str]], Callable[[str], Any]]:
    """(list_presets, load_preset) from the built-in catalog; empty if there is none."""
    try:
        from gateway.oauth import catalog
    except ImportError:
        catalog = None  # type: ignore[assignment]
    names = getattr(catalog, "list_presets", None)
    load = getattr(catalog, "load_preset", None)
    if names is None or load is None:
        return (lambda: []), (lambda name: None)
    return names, load


def cmd_providers(args: argparse.Namespace) -> int:
    list_presets, load_preset = _catalog()
    if args.show is not None:
        preset = load_preset(args.show)
        if preset is None:
            raise CliError(f"NAME '{args.show}': no built-in preset has that name "
                           "(see `gateway providers`)")
        _out(yaml.safe_dump({args.show: _plain(preset)}, sort_keys=False).rstrip())
        return EXIT_OK
    rows = []
    for name in list_presets():
        preset = load_preset(name) or {}
        rows.append([name, str(preset.get("upstream") or preset.get("issuer") or "-")])
    _table(["PRESET", "UPSTREAM"], rows)
    return EXIT_OK


def _plain(value: Any) -> Any:
    """Mappings, sequences and URLs as plain YAML-safe values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _valid_name(name: str) -> str:
    try:
        return validate_name(name)
    except BadRequest as e:
        raise CliError(f"NAME '{name}': {e.message}") from None


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    # --config is accepted before and after the subcommand: the sub-parsers use SUPPRESS so
    # an absent option there does not overwrite the one given up front.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $GATEWAY_CONFIG, else ./config.yaml)")
    parser = argparse.ArgumentParser(
        prog="gateway", description="OAuth2 token gateway.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config.")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="config file (default: $GATEWAY_CONFIG, else ./config.yaml)")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: Any, name: str, func: Callable[[argparse.Namespace], int] | None,
            helptext: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=helptext,
                                                       description=helptext)
        if func is not None:
            p.set_defaults(func=func)
        return p

    p = add(sub, "serve", cmd_serve, "run the gateway server")
    p.add_argument("--workers", type=_positive, default=1, metavar="N",
                   help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--host", default=None, help="listen address (overrides server.host)")
    p.add_argument("--port", type=_port, default=None, help="listen port (overrides server.port)")
    p.add_argument("--pidfile", metavar="PATH", default=None,
                   help="where to write the server's pid (default: gateway.pid next to the "
                        "config file); `gateway reload` reads it")
    p = add(sub, "reload", cmd_reload,
            "make the running server reload its provider config (SIGHUP)")
    p.add_argument("--pidfile", metavar="PATH", default=None,
                   help="the pidfile `gateway serve` wrote (default: next to the config file)")
    p = add(sub, "audit", cmd_audit, "show the audit trail, oldest first")
    p.add_argument("--identity", metavar="NAME", default=None, help="only this identity's events")
    p.add_argument("--since", metavar="TIME", default=None,
                   help="ISO-8601 time (2024-05-01T12:00:00Z) or a duration back from now "
                        "(30m, 24h, 7d)")
    p.add_argument("--limit", type=_positive, default=1000, metavar="N",
                   help="at most N events, the newest (default 1000)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add(sub, "keygen", cmd_keygen, "print a new encryption key")
    p = add(sub, "rotate-key", cmd_rotate_key,
            "re-encrypt every stored secret under the current encryption_key while the gateway "
            "serves; with nothing to re-encrypt, start a rotation (prints a new key last)")
    p.add_argument("--new-key", metavar="KEY", default=None,
                   help="start a rotation to this key instead of a generated one ('-': read "
                        "it from stdin); it is never printed")
    p.add_argument("--batch", type=_positive, default=500, metavar="N",
                   help="rows per transaction while re-encrypting (default 500)")
    p.add_argument("--status", action="store_true",
                   help="only report how many stored rows are not yet under the current key")
    p = add(sub, "check", cmd_check, "validate the config")
    p.add_argument("--online", action="store_true", help="also fetch discovery documents")

    ident = add(sub, "identity", None, "manage local identities and their API keys")
    isub = ident.add_subparsers(dest="identity_command", required=True, metavar="ACTION")
    p = add(isub, "add", cmd_identity_add, "create an identity and print its first API key")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--password-stdin", action="store_true",
                   help="read a web-login password from the first line of stdin")
    add(isub, "list", cmd_identity_list, "list identities")
    p = add(isub, "remove", cmd_identity_remove, "delete an identity and everything it owns")
    p.add_argument("name", metavar="NAME")
    p = add(isub, "passwd", cmd_identity_passwd, "set an identity's web-login password")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin")
    keys = add(isub, "key", None, "manage an identity's API keys")
    ksub = keys.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    p = add(ksub, "add", cmd_key_add, "create and print a new API key")
    p.add_argument("name", metavar="NAME")
    p = add(ksub, "revoke", cmd_key_revoke, "revoke a key by its prefix")
    p.add_argument("name", metavar="NAME")
    p.add_argument("prefix", metavar="PREFIX", help="the key's first 12 characters")
    p = add(ksub, "list", cmd_key_list, "list an identity's keys (prefixes only)")
    p.add_argument("name", metavar="NAME")

    conns = add(sub, "connections", None, "inspect and revoke provider connections")
    csub = conns.add_subparsers(dest="connections_command", required=True, metavar="ACTION")
    p = add(csub, "list", cmd_connections_list, "list connections (never their tokens)")
    p.add_argument("--identity", metavar="NAME", default=None)
    p = add(csub, "revoke", cmd_connections_revoke,
            "revoke a connection at the provider, then forget its tokens")
    p.add_argument("identity", metavar="IDENTITY")
    p.add_argument("provider", metavar="PROVIDER")

    p = add(sub, "providers", cmd_providers, "list the built-in provider presets")
    p.set_defaults(show=None)
    psub = p.add_subparsers(dest="providers_command", metavar="ACTION")
    show = psub.add_parser("show", parents=[common], help="print one preset")
    show.add_argument("show", metavar="NAME")
    return parser


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, not {text!r}")
    return n


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (never raises, never prints a traceback)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        code: int = args.func(args)
        return code
    except CliError as e:
        _warn(f"error: {e}")
        return e.code
    except ConfigError as e:
        where = f"{config_path(args)}: " if e.path else ""
        _warn(f"error: {where}{e.message}")
        return EXIT_USAGE
    except BadRequest as e:
        _warn(f"error: {e.message}")
        return EXIT_USAGE
    except GatewayError as e:
        _warn(f"error: {e.message}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _warn("interrupted")
        return 130
    except Exception as e:  # the promise is one line, not a traceback
        _warn(f"error: {_describe(e)}")
        return EXIT_FAILURE
