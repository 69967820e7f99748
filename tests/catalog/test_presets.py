"""The built-in catalog: every preset loads from three lines of config and yields absolute
https URLs; provider-specific settings; ``vars`` templates; explicit keys win."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml
from yarl import URL

from gateway.cli import main as cli_main
from gateway.config import CLIENT_AUTH_METHODS, Config
from gateway.errors import ConfigError
from gateway.oauth.catalog import CATALOG_DIR, QUIRKS, list_presets, load_preset

WriteConfig = Callable[..., Config]

# The issue's list; the catalog may hold more.
REQUIRED = {"soundcloud", "github", "gitlab", "google", "microsoft", "slack", "spotify",
            "dropbox", "notion", "salesforce", "atlassian", "discord", "x", "zoom", "hubspot",
            "linkedin", "strava", "box"}
SECRET = "s3cr3t-value-never-shown"


def required_vars(name: str) -> dict[str, str]:
    """Values for the variables a preset declares without a default."""
    declared = (load_preset(name) or {}).get("vars") or {}
    return {k: "https://example.test" if k.endswith("url") else "acme"
            for k, v in declared.items() if v is None}


def three_lines(name: str, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"preset": name, "client_id": "id-123", "client_secret": SECRET}
    if required_vars(name):
        entry["vars"] = required_vars(name)
    entry.update(extra)
    return entry


def provider(write_config: WriteConfig, name: str = "p", **entry: Any) -> Any:
    return write_config({"providers": {name: entry}}).providers[name]


def config_error(write_config: WriteConfig, **entry: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        provider(write_config, **entry)
    return info.value


# --------------------------------------------------------------------------- every preset


def test_catalog_holds_every_provider_the_issue_names() -> None:
    assert REQUIRED <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_is_usable_from_preset_id_and_secret(write_config: WriteConfig,
                                                          name: str) -> None:
    p = write_config({"providers": {name: three_lines(name)}}).providers[name]
    assert p.usable, p.problems
    assert p.preset == name and p.grant == "authorization_code"
    assert p.authorize_url is not None and p.token_url is not None
    assert p.upstream is not None or p.upstreams or p.upstream_from_token
    urls = [p.authorize_url, p.token_url, p.revocation_url, p.jwks_url, p.issuer, p.upstream,
            *p.upstreams.values()]
    for url in (u for u in urls if u is not None):
        assert url.is_absolute() and url.scheme == "https" and url.host, url
        assert not url.user and not url.fragment and not url.query_string, url
        assert "{" not in url.path and "%7B" not in str(url), url  # every template filled
    assert p.client_auth in CLIENT_AUTH_METHODS
    assert p.scope_separator in (" ", ",")
    if p.revocation_method != "rfc7009":
        assert p.revocation_url is not None, "a revocation quirk without an endpoint"


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_cites_the_providers_documentation(name: str) -> None:
    text = (CATALOG_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert any("https://" in line for line in comments), "no documentation cited in a comment"
    preset = load_preset(name)
    assert preset is not None and preset["title"]
    assert preset["docs"] and all(d.startswith("https://") for d in preset["docs"])


def test_lookup_of_unknown_or_unsafe_names_finds_nothing() -> None:
    for name in ("nosuch", "../gateway", "GitHub", "", "github.yaml", "git hub"):
        assert load_preset(name) is None, name


def test_a_loaded_preset_is_a_copy() -> None:
    first = load_preset("google")
    assert first is not None
    first["authorize_params"]["prompt"] = "none"  # type: ignore[index]
    second = load_preset("google")
    assert second is not None and second["authorize_params"]["prompt"] == "consent"


def test_providers_command_lists_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["providers"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line}
    assert set(list_presets()) <= listed


# --------------------------------------------------------------------------- what presets say


def test_google_asks_for_a_refresh_token_and_names_its_api_hosts(
        write_config: WriteConfig) -> None:
    p = provider(write_config, **three_lines("google"))
    assert p.authorize_params == {"access_type": "offline", "prompt": "consent"}
    assert p.pkce and p.issuer == URL("https://accounts.google.com")
    assert p.upstream == URL("https://www.googleapis.com")
    assert p.upstreams["gmail"] == URL("https://gmail.googleapis.com/gmail")
    assert p.upstreams["drive"] == URL("https://www.googleapis.com/drive")


def test_microsoft_tenant_defaults_to_common_and_offline_access_is_always_asked(
        write_config: WriteConfig) -> None:
    p = provider(write_config, **three_lines("microsoft"))
    assert p.token_url == URL("https://login.microsoftonline.com/common/oauth2/v2.0/token")
    assert p.vars == {"tenant": "common"} and "offline_access" in p.scopes
    own = provider(write_config, **three_lines("microsoft", vars={"tenant": "contoso.example"},
                                                scopes=["Mail.Read"]))
    assert own.authorize_url == URL(
        "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/authorize")
    assert own.scopes == ("Mail.Read", "offline_access")
    from_env = write_config({"providers": {"p": three_lines(
        "microsoft", vars={"tenant": "${AZURE_TENANT}"})}}, env={}).providers["p"]
    assert from_env.vars == {"tenant": "common"}  # an unset variable means the default
    opted_out = provider(write_config, **three_lines("microsoft", scopes=["Mail.Read"],
                                                      required_scopes=[]))
    assert opted_out.scopes == ("Mail.Read",)


def test_gitlab_base_url_serves_gitlab_com_or_a_self_managed_instance(
        write_config: WriteConfig) -> None:
    p = provider(write_config, **three_lines("gitlab"))
    assert p.authorize_url == URL("https://gitlab.com/oauth/authorize")
    assert p.issuer == URL("https://gitlab.com") and str(p.issuer) == "https://gitlab.com"
    own = provider(write_config, **three_lines("gitlab",
                                               vars={"base_url": "https://git.corp.example/"}))
    assert own.token_url == URL("https://git.corp.example/oauth/token")
    assert own.upstream == URL("https://git.corp.example/api/v4")
    assert str(own.issuer) == "https://git.corp.example"  # no doubled or trailing slash


def test_provider_quirks_are_declared_as_data(write_config: WriteConfig) -> None:
    def get(name: str) -> Any:
        return provider(write_config, name=name, **three_lines(name))

    salesforce = get("salesforce")
    assert salesforce.upstream is None and salesforce.upstream_from_token == "instance_url"
    assert "refresh_token" in salesforce.scopes and salesforce.never_expires
    slack = get("slack")
    assert slack.token_response_path == ("authed_user",) and slack.scope_param == "user_scope"
    assert slack.scope_separator == "," and slack.revocation_method == "bearer"
    x = get("x")
    assert x.pkce and x.client_auth == "client_secret_basic" and "offline.access" in x.scopes
    dropbox = get("dropbox")
    assert dropbox.authorize_params["token_access_type"] == "offline"
    assert dropbox.upstreams["content"] == URL("https://content.dropboxapi.com/2")
    atlassian = get("atlassian")
    assert atlassian.authorize_params["audience"] == "api.atlassian.com"
    github = get("github")
    assert github.never_expires and github.token_response_format == "auto"
    assert get("strava").expires_absolute_field == "expires_at"
    assert get("soundcloud").upstream_auth_scheme == "OAuth"
    notion = get("notion")
    assert notion.token_request_format == "json" and notion.authorize_params == {"owner": "user"}


def test_a_provider_without_preset_has_standard_behaviour(write_config: WriteConfig) -> None:
    p = provider(write_config, authorize_url="https://a.example/auth",
                 token_url="https://a.example/token", upstream="https://api.example",
                 client_id="id", client_secret="s")
    assert p.usable and p.vars == {} and p.upstreams == {} and p.missing_vars == ()
    for quirk in QUIRKS:
        assert getattr(p, quirk.key) == quirk.default, quirk.key


# --------------------------------------------------------------------------- vars


def test_a_required_variable_left_unset_names_the_key_to_set(write_config: WriteConfig) -> None:
    p = provider(write_config, name="zd", preset="zendesk", client_id="id", client_secret="s")
    assert not p.usable
    assert p.problems == ("set providers.zd.vars.subdomain (the preset's URLs need it)",)
    filled = provider(write_config, name="zd", preset="zendesk", client_id="id",
                      client_secret="s", vars={"subdomain": "acme"})
    assert filled.usable and filled.token_url == URL("https://acme.zendesk.com/oauth/tokens")


def test_a_variable_is_not_needed_when_every_templated_key_is_explicit(
        write_config: WriteConfig) -> None:
    p = provider(write_config, preset="zendesk", client_id="id", client_secret="s",
                 authorize_url="https://help.example/oauth/authorizations/new",
                 token_url="https://help.example/oauth/tokens",
                 upstream="https://help.example/api/v2")
    assert p.usable, p.problems


@pytest.mark.parametrize(("preset", "var", "value"), [
    ("microsoft", "tenant", "evil.example/x"),  # would add a path segment
    ("microsoft", "tenant", "a?b=c"),
    ("zendesk", "subdomain", "evil.example#"),
    ("zendesk", "subdomain", "user@evil"),
    ("gitlab", "base_url", "ftp://git.example"),
    ("gitlab", "base_url", "git.example"),
    ("gitlab", "base_url", "https://git.example/?a=1"),
])
def test_bad_variable_values_name_the_variable(write_config: WriteConfig, preset: str,
                                               var: str, value: str) -> None:
    err = config_error(write_config, preset=preset, vars={var: value})
    assert err.path == f"providers.p.vars.{var}"


def test_unknown_variable_and_vars_without_preset_are_errors(write_config: WriteConfig) -> None:
    err = config_error(write_config, preset="microsoft", vars={"region": "eu"})
    assert err.path == "providers.p.vars.region" and "tenant" in err.problem
    err = config_error(write_config, token_url="https://a.example/t", vars={"tenant": "x"})
    assert err.path == "providers.p.vars" and "preset" in err.problem


def test_templates_in_parameter_maps_are_filled_or_reported(tmp_path: Any) -> None:
    from pathlib import Path

    from gateway.config import parse_config

    preset = {"title": "T", "docs": ["https://t.example"], "vars": {"aud": None},
              "authorize_url": "https://t.example/a", "token_url": "https://t.example/t",
              "upstream": "https://api.t.example",
              "authorize_params": {"audience": "{aud}", "fixed": "1"}}

    def load(entry: str) -> Any:
        text = f"encryption_key: {'A' * 43}\nproviders:\n  t:\n    preset: t\n" \
               f"    client_id: id\n    client_secret: s\n{entry}"
        cfg = parse_config(text, Path(tmp_path) / "c.yaml", {},
                           presets=lambda n: preset if n == "t" else None)
        return cfg.providers["t"]

    assert load("").problems == ("set providers.t.vars.aud (the preset's URLs need it)",)
    assert load("    vars: {aud: api.t.example}\n").authorize_params == {
        "audience": "api.t.example", "fixed": "1"}
    overridden = load("    authorize_params: {audience: mine}\n")
    assert overridden.usable and overridden.authorize_params["audience"] == "mine"


# --------------------------------------------------------------------------- explicit wins


def test_explicit_keys_override_the_preset(write_config: WriteConfig) -> None:
    p = provider(write_config, **three_lines(
        "github", token_url="https://ghe.example/login/oauth/access_token", scopes=["repo"],
        pkce=False, client_auth="client_secret_basic", authorize_params={"allow_signup": "false"},
        upstreams={"uploads": "https://uploads.ghe.example", "graphql": "https://ghe.example/api"},
        never_expires=False))
    assert p.token_url == URL("https://ghe.example/login/oauth/access_token")
    assert p.authorize_url == URL("https://github.com/login/oauth/authorize")  # from the preset
    assert p.scopes == ("repo",) and p.pkce is False and p.client_auth == "client_secret_basic"
    assert p.authorize_params == {"allow_signup": "false"}
    assert p.upstreams == {"uploads": URL("https://uploads.ghe.example"),
                           "graphql": URL("https://ghe.example/api")}
    assert p.never_expires is False and p.token_response_format == "auto"
    assert p.sources["token_url"] == "config" and p.sources["authorize_url"] == "preset"


def test_an_explicit_null_keeps_the_preset_value(write_config: WriteConfig) -> None:
    p = provider(write_config, **three_lines("spotify", client_auth=None, scopes=None))
    assert p.client_auth == "client_secret_basic" and p.usable


def test_unknown_preset_names_the_key(write_config: WriteConfig) -> None:
    err = config_error(write_config, preset="nosuch", client_id="id")
    assert err.path == "providers.p.preset" and "unknown preset 'nosuch'" in err.problem


@pytest.mark.parametrize(("key", "value"), [
    ("token_request_format", "xml"),
    ("token_response_format", "yaml"),
    ("revocation_method", "delete"),
    ("scope_param", "state"),
    ("scope_param", "two words"),
    ("upstream_auth_scheme", "Bearer x"),
    ("token_response_path", "authed_user..x"),
    ("token_response_path", ["ok", 3]),
    ("upstream_from_token", "instance url"),
    ("never_expires", "sometimes"),
])
def test_bad_quirk_values_name_their_key(write_config: WriteConfig, key: str,
                                         value: Any) -> None:
    err = config_error(write_config, **three_lines("github", **{key: value}))
    assert err.path == f"providers.p.{key}"


@pytest.mark.parametrize(("upstreams", "path"), [
    ({"bad/name": "https://a.example"}, "providers.p.upstreams.bad/name"),
    ({"api": "ftp://a.example"}, "providers.p.upstreams.api"),
    ({"api": "https://a.example/?x=1"}, "providers.p.upstreams.api"),
    ({"api": "/relative"}, "providers.p.upstreams.api"),
    ({"api": ["https://a.example"]}, "providers.p.upstreams.api"),
])
def test_bad_upstreams_name_the_entry(write_config: WriteConfig, upstreams: dict[str, Any],
                                      path: str) -> None:
    assert config_error(write_config, **three_lines("google", upstreams=upstreams)).path == path


def test_upstreams_alone_are_enough(write_config: WriteConfig) -> None:
    p = provider(write_config, authorize_url="https://a.example/auth",
                 token_url="https://a.example/token", client_id="id", client_secret="s",
                 upstreams={"mail": "https://mail.example/v1"})
    assert p.usable and p.upstream is None
    assert p.upstreams == {"mail": URL("https://mail.example/v1")}


def test_every_preset_file_parses_to_plain_yaml() -> None:
    for name in list_presets():
        data = yaml.safe_load((CATALOG_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        assert isinstance(data, dict) and "client_secret" not in data and "client_id" not in data
