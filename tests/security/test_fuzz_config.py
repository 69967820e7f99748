"""Config loading under garbage: only ConfigError ever escapes (SPEC: exit 2 with one clear
sentence naming the key), and what is accepted is sane.

Four generators: arbitrary text; YAML documents built from the real key vocabulary with
values of every YAML type; random edits of a valid config; and hostile environment values
interpolated into a valid config (which must never change its structure). Hand-written
examples pin the defects this found: an infinite port (OverflowError), NaN and infinite
durations accepted, deep nesting (RecursionError), YAML aliases expanding exponentially, NUL
bytes in paths, a non-ASCII host (UnicodeError), a key with a newline breaking the one-line
message, and the body limits defaulting to a dataclass descriptor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from gateway import cli
from gateway.config import Config, parse_config
from gateway.errors import ConfigError
from gateway.tokens.crypto import generate_key
from tests.security.conftest import fuzz

KEY = generate_key()
VALID = f"""
server:
  host: 127.0.0.1
  port: 8080
  public_url: http://127.0.0.1:8080
  max_body_bytes: 1048576
  max_headers: 64
store:
  url: sqlite:///gateway.db
  busy_timeout: 2
encryption_key: {KEY}
consent:
  require_login: true
  return_to_origins: [https://app.example]
providers:
  acme:
    authorize_url: https://auth.example/authorize
    token_url: https://auth.example/token
    client_id: cid
    client_secret: ${{ACME_SECRET}}
    scopes: [read, write]
    authorize_params: {{prompt: consent}}
    upstream: https://api.example/v1
  gh:
    preset: github
    client_id: x
    client_secret: y
"""
SOURCE = Path("/nonexistent/dir/config.yaml")

TOP = ["server", "store", "consent", "providers", "encryption_key", "encryption_key_file",
       "encryption_keys_old", "log_format"]
SECTION_KEYS = {
    "server": ["host", "port", "public_url", "forwarded_headers", "max_body_bytes",
               "replay_body_bytes", "connect_timeout", "read_timeout", "pool_limit",
               "pool_limit_per_host", "refresh_skew", "token_timeout", "shutdown_grace",
               "max_url_bytes", "max_header_bytes", "max_headers",
               "max_concurrent_per_identity"],
    "store": ["url", "busy_timeout"],
    "consent": ["require_login", "link_ttl", "pending_ttl", "return_to_origins"],
}
PROVIDER_KEYS = ["preset", "issuer", "upstream", "upstreams", "authorize_url", "token_url",
                 "revocation_url", "jwks_url", "client_id", "client_secret", "client_auth",
                 "grant", "scopes", "required_scopes", "scope_separator", "pkce",
                 "authorize_params", "token_params", "vars", "scope_param",
                 "token_request_format", "token_response_format", "token_response_path",
                 "upstream_from_token", "expires_absolute_field", "never_expires",
                 "revocation_method", "upstream_auth_scheme"]
PRESETS = ["github", "google", "salesforce", "zendesk", "slack", "nope"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=30) | st.sampled_from(
               ["", "0", "-1", "1e400", "nan", "inf", "https://x.example", "http://[::1",
                "sqlite:///", "sqlite:////tmp/\x00x", "postgresql://u@h/db", "${UNSET}",
                "${A:-}", "javascript:alert(1)", "http://u:p@h/", "ftp://x", "a" * 300,
                KEY, *PRESETS, "client_secret_post", "none", "client_credentials", "json",
                "logfmt", "form"]))


def _values(depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return scalars
    inner = _values(depth - 1)
    return scalars | st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8) | st.sampled_from(PROVIDER_KEYS + TOP), inner, max_size=4)


@st.composite
def documents(draw: st.DrawFn) -> dict[Any, Any]:
    """A config-shaped document: real keys (and some others), values of any type."""
    doc: dict[Any, Any] = {}
    for key in draw(st.lists(st.sampled_from(TOP) | st.text(max_size=6), max_size=6,
                             unique=True)):
        if key in SECTION_KEYS and draw(st.booleans()):
            names = st.sampled_from(SECTION_KEYS[key]) | st.text(max_size=6)
            doc[key] = draw(st.dictionaries(names, _values(1), max_size=6))
        elif key == "providers" and draw(st.booleans()):
            entry = st.dictionaries(st.sampled_from(PROVIDER_KEYS) | st.text(max_size=6),
                                    _values(1), max_size=8)
            doc[key] = draw(st.dictionaries(st.sampled_from(["acme", "gh", "_x", "A", ""])
                                            | st.text(max_size=8), entry, max_size=3))
        else:
            doc[key] = draw(_values(2))
    if draw(st.booleans()):
        doc.setdefault("encryption_key", KEY)
    return doc


def _accepted_is_sane(cfg: Config) -> None:
    s = cfg.server
    for name in ("port", "max_body_bytes", "replay_body_bytes", "pool_limit", "max_url_bytes",
                 "max_header_bytes", "max_headers", "max_concurrent_per_identity"):
        value = getattr(s, name)
        assert type(value) is int and value >= 0, (name, value)
    for name in ("connect_timeout", "read_timeout", "refresh_skew", "token_timeout",
                 "shutdown_grace"):
        value = getattr(s, name)
        assert isinstance(value, float) and math.isfinite(value) and value >= 0, (name, value)
    assert 0 <= s.port <= 65535
    assert s.public_url.scheme in ("http", "https") and s.public_url.host
    assert math.isfinite(cfg.store.busy_timeout)
    assert cfg.encryption_key or cfg.encryption_key_file
    for p in cfg.providers.values():
        for url in (p.upstream, p.authorize_url, p.token_url, p.revocation_url, p.issuer):
            assert url is None or (url.scheme in ("http", "https") and url.host), url


def _parse(text: str, env: dict[str, str] | None = None) -> Config | None:
    """parse_config, asserting that nothing but ConfigError escapes."""
    try:
        cfg = parse_config(text, SOURCE, env or {})
    except ConfigError as e:
        assert e.message and "\n" not in e.message.strip(), e.message
        return None
    _accepted_is_sane(cfg)
    return cfg


def test_the_valid_config_parses() -> None:
    cfg = _parse(VALID, {"ACME_SECRET": "s"})
    assert cfg is not None and cfg.providers["acme"].usable and cfg.server.max_headers == 64


@pytest.mark.parametrize("text", [
    "encryption_key: k\nserver: {port: .inf}",
    "encryption_key: k\nserver: {port: -.inf}",
    "encryption_key: k\nserver: {refresh_skew: .nan}",
    "encryption_key: k\nserver: {read_timeout: .inf}",
    "encryption_key: k\nserver: {token_timeout: 'nan'}",
    "encryption_key: k\nstore: {busy_timeout: .inf}",
    "encryption_key: k\nz: " + "[" * 3000 + "]" * 3000,
    "encryption_key: k\nz: " + "{a: " * 2000 + "1" + "}" * 2000,
    "encryption_key: k\nz: " + "[" * 60 + "]" * 60,
    "encryption_key: k\nstore: {url: \"sqlite:///a\\0b\"}",
    "encryption_key_file: \"a\\0b\"",
    "encryption_key: k\nserver: {host: \"\\x80\"}",
])
def test_defects_found_by_fuzzing_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text, SOURCE, {})


def test_yaml_aliases_cannot_explode() -> None:
    """A "billion laughs" document: nine levels of nine aliases would be 387 million values."""
    text = "encryption_key: k\na0: &a0 [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    with pytest.raises(ConfigError, match="more than"):
        parse_config(text, SOURCE, {})


def test_default_body_limits_are_numbers() -> None:
    cfg = parse_config(f"encryption_key: {KEY}", SOURCE, {})
    assert cfg.server.max_body_bytes == 100 * 1024 * 1024
    assert cfg.server.replay_body_bytes == 64 * 1024
    _accepted_is_sane(cfg)


@fuzz(150)
@example(text="\t")
@example(text="%YAML 9.9\n---\na")
@example(text="!!python/object/apply:os.system ['true']")
@example(text="? [a, b]\n: c")
@example(text="a: &x\n  b: *x")
@example(text="\ufeff\x00")
@given(text=st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    _parse(text)


@fuzz(200)
@example(doc={"0\n": None, "encryption_key": KEY})
@example(doc={"server": {"host": "\x80"}, "encryption_key": KEY})
@given(doc=documents())
def test_config_shaped_documents(doc: dict[Any, Any]) -> None:
    _parse(yaml.safe_dump(doc, allow_unicode=True))


@fuzz(150)
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID)), st.integers(0, 20),
                                st.text(max_size=12)), min_size=1, max_size=4))
def test_random_edits_of_a_valid_config(edits: list[tuple[int, int, str]]) -> None:
    text = VALID
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut:]
    _parse(text, {"ACME_SECRET": "s"})


@fuzz(150)
@example(secret="x\nserver: {port: 1}")
@example(secret="'\"]}: &a *a")
@example(secret="${ACME_SECRET}")
@given(secret=st.text(max_size=40))
def test_environment_values_never_change_the_structure(secret: str) -> None:
    cfg = _parse(VALID, {"ACME_SECRET": secret})
    assert cfg is not None
    assert cfg.providers["acme"].client_secret == secret
    assert set(cfg.providers) == {"acme", "gh"} and cfg.server.port == 8080


@fuzz(25)
@given(doc=documents())
def test_gateway_check_never_prints_a_traceback(doc: dict[Any, Any], tmp_path_factory: Any,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    code = cli.main(["check", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    assert "Traceback" not in out + err
    if code == 2:
        assert "error: " in err and err.count("\n") == 1, err
