"""``describe`` (for ``gateway providers show``), ``preset_provider``, and the checks every
preset file must pass."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.oauth.catalog import describe, list_presets, parse_preset, preset_provider

WriteConfig = Callable[..., Config]
SECRET = "pa55:word%+ with-a-tail"


def test_describe_masks_the_secret_and_shows_resolved_settings(
        write_config: WriteConfig) -> None:
    cfg = write_config({"providers": {"ms": {
        "preset": "microsoft", "client_id": "app-id", "client_secret": SECRET,
        "vars": {"tenant": "contoso.example"}, "scopes": ["Mail.Read"]}}})
    shown = describe(cfg.providers["ms"])
    dumped = yaml.safe_dump(shown)
    assert SECRET not in dumped and "pa55" not in dumped
    assert shown["client_secret"] == "********" and shown["client_id"] == "app-id"
    assert shown["usable"] is True and shown["problems"] == []
    assert shown["token_url"] == (
        "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token")
    assert shown["vars"] == {"tenant": "contoso.example"}
    assert shown["scopes"] == ["Mail.Read", "offline_access"]
    assert shown["sources"]["scopes"] == "config" and shown["sources"]["token_url"] == "preset"
    assert shown["quirks"] == {}  # Microsoft follows the RFC where the gateway cares


def test_describe_lists_only_quirks_that_differ_and_says_what_is_missing(
        write_config: WriteConfig) -> None:
    cfg = write_config({"providers": {"slack": {"preset": "slack"}}})
    shown = describe(cfg.providers["slack"])
    assert shown["usable"] is False and shown["client_secret"] is None
    assert "client_id is not set" in shown["problems"]
    assert shown["quirks"] == {"scope_param": "user_scope", "token_response_path": "authed_user",
                               "never_expires": True, "revocation_method": "bearer"}
    yaml.safe_dump(shown)  # plain data only


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_resolves_on_its_own(name: str) -> None:
    p = preset_provider(name, {"subdomain": "acme"} if name == "zendesk" else None)
    assert p is not None and p.preset == name
    assert p.problems == ("client_id is not set", "client_secret is not set")
    yaml.safe_dump(describe(p))


def test_preset_provider_of_an_unknown_name_is_none() -> None:
    assert preset_provider("nosuch") is None


GOOD = """\
# Example. Source: https://example.test/docs
title: Example
docs: [https://example.test/docs]
vars: {tenant: common}
authorize_url: https://example.test/{tenant}/authorize
token_url: https://example.test/{tenant}/token
upstream: https://api.example.test
"""


def test_a_well_formed_preset_file_parses() -> None:
    assert parse_preset(GOOD, "example")["vars"] == {"tenant": "common"}


@pytest.mark.parametrize(("text", "path"), [
    (GOOD + "client_secret: oops\n", "preset example.client_secret"),
    (GOOD + "authorise_url: https://x.test\n", "preset example.authorise_url"),
    (GOOD.replace("title: Example\n", ""), "preset example.title"),
    (GOOD.replace("docs: [https://example.test/docs]\n", ""), "preset example.docs"),
    (GOOD.replace("docs: [https://example.test/docs]", "docs: [http://example.test]"),
     "preset example.docs"),
    (GOOD.replace("vars: {tenant: common}", "vars: {}"), "preset example.vars"),
    (GOOD.replace("vars: {tenant: common}", "vars: [tenant]"), "preset example.vars"),
    ("- a\n- b\n", "preset example"),
    ("title: [unclosed\n", "preset example"),
])
def test_a_broken_preset_file_is_named(text: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_preset(text, "example")
    assert info.value.path == path
