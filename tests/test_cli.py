"""The command line, run for real: ``main(argv)`` in-process and ``python -m gateway``.

Exit codes under test: 0 ok, 1 runtime failure, 2 bad usage or bad config. An identity that
already exists (or does not exist) is a bad argument, so exit 2, and nothing stored changes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.cli import main
from gateway.config import Config, load_config
from gateway.identities import IdentityService, looks_like_key
from gateway.store import create_store
from gateway.store.base import TokenFields
from gateway.tokens.crypto import box_from_config
from tests.fakes.authserver import start_auth_server

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "a long enough password"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        return self.out.rstrip("\n").splitlines()[-1]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> Callable[..., Result]:
    """Run ``main(argv)`` with optional stdin text; returns code, stdout, stderr."""

    def run(*argv: str, stdin: str | None = None) -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return Result(code, out, err)

    return run


@pytest.fixture
def cfg(write_config: Callable[..., Config]) -> Config:
    return write_config()


def conf(cfg: Config) -> list[str]:
    return ["--config", str(cfg.source)]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def in_store(cfg: Config, fn: Callable[[IdentityService, Any], Any]) -> Any:
    """Look at the store the CLI wrote, through the same code the server uses."""

    async def go() -> Any:
        store = create_store(cfg.store, box_from_config(cfg.encryption_key, None))
        await store.open()
        try:
            return await fn(IdentityService(store, box_from_config(cfg.encryption_key, None)),
                            store)
        finally:
            await store.close()

    return asyncio.run(go())


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# --------------------------------------------------------------------------- subprocess


def test_python_m_gateway_keygen_prints_a_32_byte_key(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", "keygen"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert len(base64.urlsafe_b64decode(line + "=")) == 32
    again = subprocess.run([sys.executable, "-m", "gateway", "keygen"], cwd=tmp_path,
                           env=subprocess_env(), capture_output=True, text=True, timeout=30)
    assert again.stdout != proc.stdout
    assert list(tmp_path.iterdir()) == []  # keygen needs no config and writes nothing


def test_python_m_gateway_identity_add_and_bad_config(tmp_path: Path, cfg: Config) -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", "identity", "add", "alice",
                           "--password-stdin"], cwd=tmp_path,
                          env=subprocess_env(GATEWAY_CONFIG=str(cfg.source)),
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.splitlines()[-1]
    assert looks_like_key(key)
    found = in_store(cfg, lambda svc, store: svc.authenticate_key(key))
    assert found is not None and found.name == "alice"

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"encryption_key: {cfg.encryption_key}\nserver:\n  port: 99999\n")
    proc = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(bad)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(bad) in line and "server.port" in line
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# --------------------------------------------------------------------------- identities


def test_identity_add_prints_the_key_last_and_it_works(cli: Callable[..., Result],
                                                       cfg: Config) -> None:
    r = cli("identity", "add", "alice", "--password-stdin", *conf(cfg), stdin=PASSWORD + "\n")
    assert r.code == 0, r.err
    assert looks_like_key(r.last_line)
    assert r.out.count("gwk_") == 1  # shown once
    identity = in_store(cfg, lambda svc, store: svc.authenticate_key(r.last_line))
    assert identity is not None and identity.name == "alice"
    assert in_store(cfg, lambda svc, store: svc.verify_password("alice", PASSWORD)) is not None


def test_identity_add_without_password(cli: Callable[..., Result], cfg: Config) -> None:
    r = cli(*conf(cfg), "identity", "add", "bot")
    assert r.code == 0 and looks_like_key(r.last_line)
    assert in_store(cfg, lambda svc, store: store.get_identity("bot")).password_hash is None


def test_adding_an_existing_identity_fails_and_changes_nothing(
        cli: Callable[..., Result], cfg: Config) -> None:
    first = cli("identity", "add", "alice", "--password-stdin", *conf(cfg), stdin=PASSWORD)
    assert first.code == 0
    r = cli("identity", "add", "alice", "--password-stdin", *conf(cfg),
            stdin="another password\n")
    assert r.code == 2
    assert "alice" in one_line(r.err) and "already exists" in r.err
    assert "gwk_" not in r.out
    keys = in_store(cfg, lambda svc, store: svc.list_keys("alice"))
    assert len(keys) == 1
    assert in_store(cfg, lambda svc, store: svc.verify_password("alice", PASSWORD)) is not None
    assert in_store(cfg, lambda svc, store: svc.verify_password("alice", "another password")
                    ) is None


@pytest.mark.parametrize("name", ["bad name", "-x", "a" * 65, "x/y"])
def test_invalid_names_fail_before_anything_is_stored(cli: Callable[..., Result], cfg: Config,
                                                      name: str) -> None:
    r = cli("identity", "add", *conf(cfg), "--", name)
    assert r.code == 2
    assert "NAME" in one_line(r.err)
    assert not cfg.store.path.exists()  # type: ignore[union-attr]


def test_short_password_fails_and_stores_nothing(cli: Callable[..., Result],
                                                 cfg: Config) -> None:
    r = cli("identity", "add", "alice", "--password-stdin", *conf(cfg), stdin="short\n")
    assert r.code == 2 and "password" in one_line(r.err)
    r = cli("identity", "add", "alice", "--password-stdin", *conf(cfg), stdin="")
    assert r.code == 2 and "--password-stdin" in one_line(r.err)
    assert not cfg.store.path.exists()  # type: ignore[union-attr]


def test_identity_list_and_remove(cli: Callable[..., Result], cfg: Config) -> None:
    assert cli("identity", "add", "alice", "--password-stdin", *conf(cfg), stdin=PASSWORD).code == 0
    assert cli("identity", "add", "bob", *conf(cfg)).code == 0
    r = cli("identity", "list", *conf(cfg))
    assert r.code == 0
    rows = {line.split()[0]: line.split() for line in r.out.splitlines()[1:]}
    assert rows["alice"][1:3] == ["yes", "1"] and rows["bob"][1:3] == ["no", "1"]
    assert "gwk_" not in r.out

    r = cli("identity", "remove", "alice", *conf(cfg))
    assert r.code == 0
    names = [line.split()[0] for line in cli("identity", "list", *conf(cfg)).out.splitlines()[1:]]
    assert names == ["bob"]
    r = cli("identity", "remove", "alice", *conf(cfg))
    assert r.code == 2 and "alice" in one_line(r.err)


def test_identity_passwd(cli: Callable[..., Result], cfg: Config) -> None:
    cli("identity", "add", "alice", *conf(cfg))
    r = cli("identity", "passwd", "alice", "--password-stdin", *conf(cfg), stdin=PASSWORD + "\n")
    assert r.code == 0, r.err
    assert in_store(cfg, lambda svc, store: svc.verify_password("alice", PASSWORD)) is not None

    r = cli("identity", "passwd", "alice", "--password-stdin", *conf(cfg), stdin="tiny\n")
    assert r.code == 2 and "password" in one_line(r.err)
    assert in_store(cfg, lambda svc, store: svc.verify_password("alice", PASSWORD)) is not None

    r = cli("identity", "passwd", "alice", *conf(cfg), stdin="not a tty\n")
    assert r.code == 2 and "--password-stdin" in one_line(r.err)

    r = cli("identity", "passwd", "nobody", "--password-stdin", *conf(cfg), stdin=PASSWORD)
    assert r.code == 2 and "nobody" in one_line(r.err)


def test_api_keys_add_list_revoke(cli: Callable[..., Result], cfg: Config) -> None:
    first = cli("identity", "add", "alice", *conf(cfg)).last_line
    r = cli("identity", "key", "add", "alice", *conf(cfg))
    assert r.code == 0
    second = r.last_line
    assert looks_like_key(second) and second != first

    r = cli("identity", "key", "list", "alice", *conf(cfg))
    assert r.code == 0
    assert first[:12] in r.out and second[:12] in r.out
    assert first not in r.out and second not in r.out  # prefixes only

    r = cli("identity", "key", "revoke", "alice", first[:12], *conf(cfg))
    assert r.code == 0, r.err
    listing = cli("identity", "key", "list", "alice", *conf(cfg)).out
    status = {line.split()[0]: line.split()[1] for line in listing.splitlines()[1:]}
    assert status == {first[:12]: "revoked", second[:12]: "active"}
    assert in_store(cfg, lambda svc, store: svc.authenticate_key(first)) is None
    assert in_store(cfg, lambda svc, store: svc.authenticate_key(second)) is not None

    for args in (["alice", first[:12]], ["alice", "gwk_nothere0"], ["alice", "zz"],
                 ["nobody", second[:12]]):
        r = cli("identity", "key", "revoke", *args, *conf(cfg))
        assert r.code == 2, args
        one_line(r.err)
    assert in_store(cfg, lambda svc, store: svc.authenticate_key(second)) is not None
    r = cli("identity", "key", "add", "nobody", *conf(cfg))
    assert r.code == 2 and "gwk_" not in r.out


# --------------------------------------------------------------------------- config handling


@pytest.mark.parametrize(("text", "where"), [
    ("server:\n  port: 99999\n", "server.port"),
    ("server:\n  prot: 1\n", "server.prot"),
    ("providers:\n  x:\n    upstream: ftp://nope\n", "providers.x.upstream"),
    ("store:\n  url: mysql://db/x\n", "store.url"),
    ("server: [oops\n", "not valid YAML"),
])
@pytest.mark.parametrize("command", [["check"], ["identity", "list"], ["serve"],
                                     ["identity", "add", "alice"], ["connections", "list"]])
def test_bad_config_exits_2_with_one_line_naming_the_key(
        cli: Callable[..., Result], tmp_path: Path, encryption_key: str, text: str, where: str,
        command: list[str]) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(f"encryption_key: {encryption_key}\n{text}")
    r = cli(*command, "--config", str(path))
    assert r.code == 2
    line = one_line(r.err)
    assert where in line and str(path) in line
    assert not (tmp_path / "gateway.db").exists()


def test_bad_encryption_key_is_a_config_error(cli: Callable[..., Result],
                                               tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("encryption_key: not-base64-of-32-bytes\n")
    for command in (["check"], ["identity", "list"]):
        r = cli(*command, "--config", str(path))
        assert r.code == 2
        assert "encryption_key" in one_line(r.err)
    assert not (tmp_path / "gateway.db").exists()


def test_missing_config_file(cli: Callable[..., Result], tmp_path: Path) -> None:
    r = cli("check", "--config", str(tmp_path / "absent.yaml"))
    assert r.code == 2 and "absent.yaml" in one_line(r.err)


def test_config_from_env_and_default_path(cli: Callable[..., Result], cfg: Config,
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(cfg.source))
    assert cli("identity", "add", "alice").code == 0
    monkeypatch.delenv("GATEWAY_CONFIG")
    monkeypatch.chdir(cfg.source.parent)  # ./config.yaml
    r = cli("identity", "list")
    assert r.code == 0 and "alice" in r.out
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = cli("identity", "list")
    assert r.code == 2 and "config.yaml" in one_line(r.err)


def test_usage_errors_exit_2(cli: Callable[..., Result], cfg: Config) -> None:
    for argv in ([], ["frobnicate"], ["identity"], ["identity", "add"],
                 ["serve", "--workers", "0"], ["serve", "--port", "70000"],
                 ["identity", "key", "revoke", "alice"]):
        r = cli(*argv, *conf(cfg))
        assert r.code == 2, argv
        assert "usage:" in r.err
    assert cli("--help").code == 0


def test_check_reports_usable_and_unusable_providers(cli: Callable[..., Result],
                                                     write_config: Callable[..., Config],
                                                     tmp_path: Path) -> None:
    cfg = write_config({"providers": {
        "ready": {"authorize_url": "https://a.example/auth", "token_url": "https://a.example/t",
                  "client_id": "id", "client_secret": "s", "upstream": "https://api.example"},
        "pending": {"authorize_url": "https://a.example/auth", "token_url": "https://a.example/t",
                    "client_id": "${PENDING_ID}", "client_secret": "${PENDING_SECRET}",
                    "upstream": "https://api.example"},
    }})
    r = cli("check", *conf(cfg))
    assert r.code == 0, r.err
    lines = {line.split()[0]: line for line in r.out.splitlines() if line.startswith("  ")}
    assert "usable" in lines["ready"] and "not usable" not in lines["ready"]
    assert "not usable" in lines["pending"]
    assert "client_id is not set" in lines["pending"]
    assert "s3cret" not in r.out
    assert not (tmp_path / "gateway.db").exists()  # check never creates the store


def test_check_online_without_issuers(cli: Callable[..., Result], cfg: Config) -> None:
    r = cli("check", "--online", *conf(cfg))
    assert r.code == 0 and "online" in r.out


async def test_check_online_fetches_discovery_documents(
        cli: Callable[..., Result], write_config: Callable[..., Config],
        aiohttp_server: Any) -> None:
    fake = await start_auth_server(aiohttp_server)
    public = {"client_id": "x", "client_auth": "none", "upstream": "https://api.example"}
    cfg = write_config({"providers": {
        "idp": {"issuer": str(fake.url), **public},
        "dead": {"issuer": f"http://127.0.0.1:{_closed_port()}", **public},
    }})
    r = await acli(cli, "check", "--online", *conf(cfg))
    if "discovery unavailable" in r.out:  # this installation has no discovery module
        assert r.code == 0 and fake.hits["discovery"] == 0
    else:
        assert r.code == 1
        assert "idp" in r.out and fake.hits["discovery"] >= 1
        assert "providers.dead.issuer" in one_line(r.err)


def test_shipped_config_checks_on_a_fresh_machine(cli: Callable[..., Result], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GITHUB_CLIENT_ID", "GITHUB_CLIENT_SECRET", "GOOGLE_CLIENT_ID",
                "GOOGLE_CLIENT_SECRET", "GATEWAY_PUBLIC_URL", "GATEWAY_STORE_URL"):
        monkeypatch.delenv(var, raising=False)
    shipped = tmp_path / "config.yaml"
    shipped.write_text((REPO / "config.yaml").read_text())
    r = cli("check", "--config", str(shipped))
    assert r.code == 0, r.err
    assert "github" in r.out and "not usable" in r.out
    assert not (tmp_path / "gateway.key").exists()
    r = cli("identity", "add", "alice", "--config", str(shipped))  # first use makes the key
    assert r.code == 0, r.err
    assert (tmp_path / "gateway.key").stat().st_mode & 0o777 == 0o600


def test_providers_lists_presets(cli: Callable[..., Result], cfg: Config) -> None:
    r = cli("providers", *conf(cfg))
    assert r.code == 0
    assert r.out.splitlines()[0].split()[0] == "PRESET"
    r = cli("providers", "show", "no-such-preset")
    assert r.code == 2 and "no-such-preset" in one_line(r.err)


# --------------------------------------------------------------------------- connections


async def seed_connection(cfg: Config, name: str, provider: str,
                          tokens: TokenFields) -> None:
    box = box_from_config(cfg.encryption_key, None)
    store = create_store(cfg.store, box)
    await store.open()
    try:
        identity = await store.get_identity(name)
        assert identity is not None
        await store.put_connection(identity.id, provider, tokens, None, time.time())
    finally:
        await store.close()


async def acli(cli: Callable[..., Result], *argv: str) -> Result:
    """The CLI runs its own event loop; run it in a thread so this loop keeps serving fakes."""
    return await asyncio.to_thread(cli, *argv)


async def test_connections_list_never_shows_tokens(cli: Callable[..., Result],
                                                   cfg: Config) -> None:
    await acli(cli, "identity", "add", "alice", *conf(cfg))
    await acli(cli, "identity", "add", "bob", *conf(cfg))
    tokens = TokenFields("at-SECRET-access", "rt-SECRET-refresh", expires_at=2_000_000_000.0,
                         scopes=("read", "write"))
    await seed_connection(cfg, "alice", "demo", tokens)
    await seed_connection(cfg, "bob", "other", TokenFields("at-SECRET-bob"))
    r = await acli(cli, "connections", "list", *conf(cfg))
    assert r.code == 0, r.err
    assert "SECRET" not in r.out + r.err
    rows = [line.split() for line in r.out.splitlines()[1:]]
    assert ["alice", "demo", "active", "2033-05-18", "03:33:20Z", "read", "write"] in rows
    assert ["bob", "other", "active", "never", "-"] in rows
    r = await acli(cli, "connections", "list", "--identity", "bob", *conf(cfg))
    assert [line.split()[0] for line in r.out.splitlines()[1:]] == ["bob"]
    r = await acli(cli, "connections", "list", "--identity", "carol", *conf(cfg))
    assert r.code == 2 and "carol" in one_line(r.err)


async def test_connections_revoke_at_the_provider(cli: Callable[..., Result],
                                                  write_config: Callable[..., Config],
                                                  aiohttp_server: Any) -> None:
    fake = await start_auth_server(aiohttp_server)
    cfg = write_config({"providers": {"fake": fake.config_entry(
        upstream="http://127.0.0.1:9/api")}})
    await acli(cli, "identity", "add", "alice", *conf(cfg))
    issued = fake.issue_tokens("alice", scopes=["read"])
    await seed_connection(cfg, "alice", "fake", TokenFields(
        issued["access_token"], issued["refresh_token"], scopes=("read",)))

    r = await acli(cli, "connections", "revoke", "alice", "fake", *conf(cfg))
    assert r.code == 0, r.err
    hints = [q.params.get("token_type_hint") for q in fake.requests if q.endpoint == "revoke"]
    assert hints == ["refresh_token", "access_token"]  # refresh token first (RFC 7009 §2.1)
    assert fake.is_valid_refresh_token(issued["refresh_token"]) is None
    assert fake.is_valid_access_token(issued["access_token"]) is None
    assert issued["access_token"] not in r.out + r.err
    listing = await acli(cli, "connections", "list", *conf(cfg))
    assert listing.out.splitlines()[1:] == []

    r = await acli(cli, "connections", "revoke", "alice", "fake", *conf(cfg))
    assert r.code == 2 and "fake" in one_line(r.err)  # nothing left to revoke
    assert fake.hits["revoke"] == 2
    r = await acli(cli, "connections", "revoke", "nobody", "fake", *conf(cfg))
    assert r.code == 2 and "nobody" in one_line(r.err)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connections_revoke_forgets_tokens_when_the_provider_is_unreachable(
        cli: Callable[..., Result], write_config: Callable[..., Config],
        aiohttp_server: Any) -> None:
    fake = await start_auth_server(aiohttp_server)
    dead = f"http://127.0.0.1:{_closed_port()}/revoke"
    cfg = write_config({"providers": {
        "down": fake.config_entry(revocation_url=dead, upstream="http://127.0.0.1:9/"),
        "failing": fake.config_entry(upstream="http://127.0.0.1:9/"),
        "norevoke": {**fake.config_entry(upstream="http://127.0.0.1:9/"),
                     "revocation_url": None},
    }})
    await acli(cli, "identity", "add", "alice", *conf(cfg))
    for provider in ("down", "failing", "norevoke"):
        await seed_connection(cfg, "alice", provider, TokenFields("at-x", "rt-x"))
    fake.fail_next(2, status=503, endpoint="revoke")

    for provider in ("down", "failing", "norevoke"):
        r = await acli(cli, "connections", "revoke", "alice", provider, *conf(cfg))
        assert r.code == 0, r.err
        assert provider in r.err and "not revoked" in r.err  # said on stderr
        assert "Forgot" in r.out
    assert fake.hits["revoke"] == 2  # "failing" tried both tokens; "norevoke" never called
    listing = await acli(cli, "connections", "list", *conf(cfg))
    assert listing.out.splitlines()[1:] == []


async def test_connections_revoke_for_a_provider_no_longer_configured(
        cli: Callable[..., Result], cfg: Config) -> None:
    await acli(cli, "identity", "add", "alice", *conf(cfg))
    await seed_connection(cfg, "alice", "gone", TokenFields("at-x", "rt-x"))
    r = await acli(cli, "connections", "revoke", "alice", "gone", *conf(cfg))
    assert r.code == 0 and "not revoked" in r.err
    assert (await acli(cli, "connections", "list", *conf(cfg))).out.splitlines()[1:] == []


# --------------------------------------------------------------------------- serve


async def test_serve_runs_until_sigterm(cfg: Config, tmp_path: Path) -> None:
    port = _closed_port()
    data = yaml.safe_load(cfg.source.read_text())
    data["server"]["public_url"] = f"http://127.0.0.1:{port}"
    cfg.source.write_text(yaml.safe_dump(data))
    load_config(cfg.source, env={})
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--port", str(port), "--config",
        str(cfg.source), env=subprocess_env(), cwd=tmp_path,
        stdout=log, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            status = None
            deadline = time.monotonic() + 20
            while status is None and time.monotonic() < deadline and proc.returncode is None:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/_gateway/healthz") as resp:
                        status = resp.status
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)  # polling a port that is not listening yet
            assert status == 200, (tmp_path / "serve.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
