"""Config loading: every validation path names the YAML key at fault; interpolation; paths."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from gateway.config import Config, interpolate, load_config, parse_config, parse_store_url
from gateway.errors import ConfigError

KEY = "A" * 43  # syntactically a key; config loading does not decode it


def load(text: str, env: Mapping[str, str] | None = None, tmp: Path = Path("/srv/gw"),
         presets: Any = None) -> Config:
    kwargs = {"presets": presets} if presets is not None else {}
    return parse_config(text, tmp / "config.yaml", env or {}, **kwargs)


def fails(text: str, env: Mapping[str, str] | None = None, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, env, **kw)
    return info.value


def with_key(body: str) -> str:
    return f"encryption_key: {KEY}\n{body}"


PROVIDER = """
providers:
  demo:
    authorize_url: https://auth.example/authorize
    token_url: https://auth.example/token
    client_id: id
    client_secret: secret
    upstream: https://api.example
"""


# --------------------------------------------------------------------------- happy paths


def test_minimal_config_uses_defaults() -> None:
    cfg = load(f"encryption_key: {KEY}\n")
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8080
    assert cfg.server.public_url == URL("http://127.0.0.1:8080")
    assert cfg.server.redirect_uri == "http://127.0.0.1:8080/_gateway/callback"
    assert cfg.store.kind == "sqlite" and cfg.store.path == Path("/srv/gw/gateway.db")
    assert cfg.consent.require_login is True
    assert cfg.providers == {}
    assert cfg.encryption_key == KEY and cfg.encryption_key_file is None


def test_full_provider_is_usable() -> None:
    cfg = load(with_key(PROVIDER))
    p = cfg.providers["demo"]
    assert p.usable and p.problems == ()
    assert p.token_url == URL("https://auth.example/token")
    assert p.client_auth == "client_secret_basic" and p.pkce is True


def test_public_url_with_base_path_gives_redirect_uri_under_it() -> None:
    cfg = load(with_key("server:\n  public_url: https://gw.example/base/\n"))
    assert cfg.server.redirect_uri == "https://gw.example/base/_gateway/callback"


def test_wildcard_host_derives_loopback_public_url() -> None:
    cfg = load(with_key("server:\n  host: 0.0.0.0\n  port: 9000\n"))
    assert cfg.server.public_url == URL("http://127.0.0.1:9000")


def test_preset_supplies_values_and_explicit_keys_override() -> None:
    preset = {"authorize_url": "https://p.example/auth", "token_url": "https://p.example/token",
              "upstream": "https://p.example/api", "scopes": ["a", "b"],
              "client_auth": "client_secret_post", "authorize_params": {"x": "1", "y": "2"}}
    cfg = load(with_key("""
providers:
  p:
    preset: demo
    upstream: https://mirror.example/api
    client_id: id
    client_secret: s
    authorize_params: {y: "3"}
"""), presets=lambda name: preset if name == "demo" else None)
    p = cfg.providers["p"]
    assert p.upstream == URL("https://mirror.example/api")
    assert p.token_url == URL("https://p.example/token")
    assert p.scopes == ("a", "b") and p.client_auth == "client_secret_post"
    assert dict(p.authorize_params) == {"x": "1", "y": "3"}
    assert p.usable


# --------------------------------------------------------------------------- key paths


@pytest.mark.parametrize(("body", "path"), [
    ("serverx: {}\n", "serverx"),
    ("server:\n  prot: 1\n", "server.prot"),
    ("store:\n  path: x.db\n", "store.path"),
    ("consent:\n  require_logon: true\n", "consent.require_logon"),
    (PROVIDER + "    upstreem: https://x.example\n", "providers.demo.upstreem"),
])
def test_unknown_keys_are_errors_at_every_depth(body: str, path: str) -> None:
    err = fails(with_key(body))
    assert err.path == path
    assert "unknown key" in str(err) and str(err).startswith(path)


@pytest.mark.parametrize(("body", "path", "words"), [
    ("server: [1, 2]\n", "server", "mapping"),
    ("server:\n  port: abc\n", "server.port", "whole number"),
    ("server:\n  port: 70000\n", "server.port", "at most 65535"),
    ("server:\n  port: -1\n", "server.port", "at least 0"),
    ("server:\n  port: 80.5\n", "server.port", "whole number"),
    ("server:\n  port: true\n", "server.port", "whole number"),
    ("server:\n  host: [a]\n", "server.host", "string"),
    ("server:\n  read_timeout: 0\n", "server.read_timeout", "at least"),
    ("server:\n  forwarded_headers: maybe\n", "server.forwarded_headers", "true or false"),
    ("consent:\n  require_login: perhaps\n", "consent.require_login", "true or false"),
    ("consent:\n  link_ttl: 3600\n", "consent.link_ttl", "at most 600"),
    ("log_format: xml\n", "log_format", "json or logfmt"),
    ("providers: [a]\n", "providers", "mapping"),
    ("providers:\n  demo: 3\n", "providers.demo", "mapping"),
    ("providers:\n  Bad!Name: {}\n", "providers.Bad!Name", "provider names"),
    (PROVIDER + "    scopes: 5\n", "providers.demo.scopes", "list of strings"),
    (PROVIDER + "    scopes: [a, 1]\n", "providers.demo.scopes", "list of strings"),
    (PROVIDER + "    authorize_params: [a]\n", "providers.demo.authorize_params", "mapping"),
    (PROVIDER + "    authorize_params: {a: [1]}\n", "providers.demo.authorize_params.a",
     "string"),
    (PROVIDER + "    client_auth: jwt\n", "providers.demo.client_auth", "one of"),
    (PROVIDER + "    grant: password\n", "providers.demo.grant", "one of"),
    (PROVIDER + "    pkce: sometimes\n", "providers.demo.pkce", "true or false"),
    (PROVIDER + "    preset: nosuch\n", "providers.demo.preset", "unknown preset"),
])
def test_wrong_values_name_their_key(body: str, path: str, words: str) -> None:
    err = fails(with_key(body), presets=lambda name: None)
    assert err.path == path
    assert words in err.problem


@pytest.mark.parametrize(("key", "value"), [
    ("upstream", "ftp://files.example/"),
    ("upstream", "not a url"),
    ("upstream", "/relative/path"),
    ("token_url", "https://user:pw@auth.example/token"),
    ("authorize_url", "https://auth.example/authorize#frag"),
    ("revocation_url", "https://auth.example:99999/revoke"),
    ("issuer", "mailto:someone@example.com"),
])
def test_bad_provider_urls(key: str, value: str) -> None:
    err = fails(with_key(PROVIDER + f"    {key}: '{value}'\n"))
    assert err.path == f"providers.demo.{key}"
    assert "URL" in err.problem or "fragment" in err.problem


def test_url_that_is_not_a_string() -> None:
    err = fails(with_key(PROVIDER + "    jwks_url: [https://a.example]\n"))
    assert err.path == "providers.demo.jwks_url"


def test_public_url_must_not_have_a_query_and_must_be_http() -> None:
    assert fails(with_key("server:\n  public_url: https://gw.example/?a=1\n")).path == \
        "server.public_url"
    assert fails(with_key("server:\n  public_url: gw.example\n")).path == "server.public_url"


def test_return_to_origins_name_the_bad_entry() -> None:
    err = fails(with_key("consent:\n  return_to_origins: [https://ok.example, 'javascript:x']\n"))
    assert err.path == "consent.return_to_origins[1]"


def test_missing_encryption_key() -> None:
    err = fails("server:\n  port: 8080\n")
    assert err.path == "encryption_key"
    assert "gateway keygen" in err.problem


def test_encryption_key_from_unset_env_var_is_missing() -> None:
    err = fails("encryption_key: ${GATEWAY_ENCRYPTION_KEY}\n", env={})
    assert err.path == "encryption_key"


def test_both_key_and_key_file() -> None:
    err = fails(f"encryption_key: {KEY}\nencryption_key_file: gateway.key\n")
    assert err.path == "encryption_key_file"
    assert "not both" in err.problem


def test_key_file_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    cfg = load("encryption_key_file: keys/gateway.key\n", tmp=tmp_path)
    assert cfg.encryption_key_file == tmp_path / "keys" / "gateway.key"
    cfg = load("encryption_key_file: /etc/gw.key\n", tmp=tmp_path)
    assert cfg.encryption_key_file == Path("/etc/gw.key")


@pytest.mark.parametrize(("url", "words"), [
    ("mysql://db.example/gw", "must start with"),
    ("sqlite://gateway.db", "must start with"),
    ("sqlite:///", "no database file"),
    ("sqlite:////", "no database file"),
    ("gateway.db", "must start with"),
])
def test_bad_store_urls(url: str, words: str) -> None:
    err = fails(with_key(f"store:\n  url: '{url}'\n"))
    assert err.path == "store.url"
    assert words in err.problem


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(f"encryption_key: {KEY}\nserver:\n  port: [8080\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "not valid YAML at line" in str(info.value)


def test_yaml_that_is_not_a_mapping() -> None:
    err = fails("- a\n- b\n")
    assert "mapping" in str(err)


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, env={})
    assert str(missing) in str(info.value) and "not found" in str(info.value)


def test_empty_file_only_lacks_the_key() -> None:
    assert fails("").path == "encryption_key"


def test_null_provider_values_mean_default() -> None:
    cfg = load(with_key(PROVIDER + "    client_auth: null\n    scopes: null\n"))
    assert cfg.providers["demo"].client_auth == "client_secret_basic"


# --------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("${A}", {"A": "x"}, "x"),
    ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
    ("${A:-dflt}", {}, "dflt"),
    ("${A:-dflt}", {"A": ""}, "dflt"),
    ("${A:-dflt}", {"A": "set"}, "set"),
    ("${A}", {}, ""),
    ("${A}", {"A": ""}, ""),
    ("${A:-}", {}, ""),
    ("$A and ${not valid}", {"A": "x"}, "$A and ${not valid}"),
    ("${A}${B}", {"A": "1", "B": "2"}, "12"),
])
def test_interpolate(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env, "x") == expected


def test_interpolation_fills_secrets_and_numbers() -> None:
    text = with_key("""
server:
  port: ${PORT:-9001}
providers:
  demo:
    authorize_url: https://auth.example/authorize
    token_url: ${TOKEN_URL:-https://auth.example/token}
    client_id: ${DEMO_ID}
    client_secret: ${DEMO_SECRET}
    upstream: https://api.example
    scopes: ["${SCOPE:-read}", write]
""")
    cfg = load(text, env={"DEMO_ID": "the-id", "DEMO_SECRET": "s3cret", "PORT": ""})
    p = cfg.providers["demo"]
    assert cfg.server.port == 9001
    assert (p.client_id, p.client_secret) == ("the-id", "s3cret")
    assert p.scopes == ("read", "write")
    assert p.token_url == URL("https://auth.example/token")
    assert p.usable


def test_a_value_from_the_environment_cannot_change_the_structure() -> None:
    env = {"DEMO_ID": "x\nclient_secret: injected", "DEMO_SECRET": "s"}
    cfg = load(with_key(PROVIDER.replace("client_id: id", "client_id: ${DEMO_ID}")
                        .replace("client_secret: secret", "client_secret: ${DEMO_SECRET}")),
               env=env)
    assert cfg.providers["demo"].client_id == env["DEMO_ID"]
    assert cfg.providers["demo"].client_secret == "s"


def test_load_config_reads_the_process_environment_when_none_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_KEY", KEY)
    path = tmp_path / "config.yaml"
    path.write_text("encryption_key: ${GW_TEST_KEY}\n")
    assert load_config(path).encryption_key == KEY


# --------------------------------------------------------------------------- store paths


def test_relative_sqlite_path_is_relative_to_the_config_not_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (conf_dir / "config.yaml").write_text(with_key("store:\n  url: sqlite:///data/gw.db\n"))
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("../etc/config.yaml"), env={})
    assert cfg.store.path == (conf_dir / "data" / "gw.db").resolve()
    assert cfg.source == (conf_dir / "config.yaml").resolve()


def test_absolute_sqlite_path() -> None:
    cfg = parse_store_url("sqlite:////var/lib/gw/gw.db", Path("/elsewhere"))
    assert cfg.kind == "sqlite" and cfg.path == Path("/var/lib/gw/gw.db")


@pytest.mark.parametrize("url", ["postgresql://gw@db.example/gw", "postgres://db/gw"])
def test_postgres_urls(url: str) -> None:
    cfg = parse_store_url(url, Path("/x"))
    assert cfg.kind == "postgresql" and cfg.path is None and cfg.url == url


# --------------------------------------------------------------------------- usability


def test_provider_with_missing_secrets_is_loaded_but_not_usable() -> None:
    text = with_key(PROVIDER.replace("client_id: id", "client_id: ${DEMO_ID}")
                    .replace("client_secret: secret", "client_secret: ${DEMO_SECRET}"))
    p = load(text, env={}).providers["demo"]
    assert not p.usable
    assert p.problems == ("client_id is not set", "client_secret is not set")


def test_provider_without_endpoints_lists_every_reason() -> None:
    p = load(with_key("providers:\n  bare: {}\n")).providers["bare"]
    assert not p.usable
    assert set(p.problems) == {"no upstream URL", "no token_url (or issuer for discovery)",
                               "no authorize_url (or issuer for discovery)",
                               "client_id is not set", "client_secret is not set"}


def test_public_client_and_issuer_need_no_secret_or_endpoints() -> None:
    p = load(with_key("""
providers:
  oidc:
    issuer: https://id.example
    client_id: public
    client_auth: none
    upstream: https://api.example
""")).providers["oidc"]
    assert p.usable, p.problems


def test_client_credentials_needs_no_authorize_url() -> None:
    p = load(with_key("""
providers:
  m2m:
    grant: client_credentials
    token_url: https://auth.example/token
    client_id: id
    client_secret: s
    upstream: https://api.example
""")).providers["m2m"]
    assert p.usable, p.problems


def test_client_secret_is_not_in_the_repr() -> None:
    cfg = load(with_key(PROVIDER))
    assert "secret" not in repr(cfg.providers["demo"]).replace("client_secret", "")
    assert KEY not in repr(cfg)


# --------------------------------------------------------------------------- shipped config


def test_shipped_config_loads_on_a_fresh_machine() -> None:
    shipped = Path(__file__).resolve().parent.parent / "config.yaml"
    cfg = load_config(shipped, env={})
    assert cfg.store.kind == "sqlite"
    assert cfg.store.path == shipped.parent / "gateway.db"
    assert cfg.encryption_key_file == shipped.parent / "gateway.key"
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert cfg.providers and not any(p.usable for p in cfg.providers.values())
    for p in cfg.providers.values():
        assert "client_id is not set" in p.problems


def test_shipped_config_providers_become_usable_with_their_env_vars() -> None:
    shipped = Path(__file__).resolve().parent.parent / "config.yaml"
    data = yaml.safe_load(shipped.read_text())
    env = {}
    for spec in data["providers"].values():
        for key in ("client_id", "client_secret"):
            var = spec[key].strip("${}").split(":-")[0]
            env[var] = f"value-of-{var}"
    cfg = load_config(shipped, env=env)
    assert all(p.usable for p in cfg.providers.values()), {
        n: p.problems for n, p in cfg.providers.items()}
