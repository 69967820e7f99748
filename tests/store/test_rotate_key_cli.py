"""``gateway rotate-key`` end to end on every backend: start a rotation (a new key, printed
last and only then), re-encrypt after the config switch, report when old keys can go; bad
input changes nothing; no secret but the generated key is ever printed."""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from gateway import cli
from gateway.config import Config
from gateway.keyrotation import API_KEY_SECRET, api_key_mac, decide
from gateway.store.base import TokenFields
from gateway.tokens.crypto import SecretBox, decode_key, derive, generate_key
from tests.store.conftest import Backend, StoreFactory

NOW = 1_700_000_000.0


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        return self.out.rstrip("\n").rsplit("\n", 1)[-1]


Run = Callable[..., Awaitable[Result]]


@pytest.fixture
def store_url(backend: Backend) -> str:
    spec = backend.holder_spec
    return f"sqlite:///{spec['path']}" if spec["kind"] == "sqlite" else str(spec["url"])


@pytest.fixture
def config_for(write_config: Callable[..., Config], store_url: str) -> Callable[..., Config]:
    def make(key: str, old: list[str] | None = None) -> Config:
        return write_config({"store": {"url": store_url}, "encryption_key": key,
                             "encryption_keys_old": old or []},
                            name=f"config-{secrets.token_hex(4)}.yaml")

    return make


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    async def go(cfg: Config, *args: str, stdin: str = "") -> Result:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, ["--config", str(cfg.source), "rotate-key",
                                                  *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return go


async def seed(open_store: StoreFactory, key: str) -> tuple[int, str]:
    """An identity with one connection under ``key``; (identity id, the access token)."""
    store = await open_store(SecretBox(decode_key(key)))
    alice = await store.create_identity("alice", None, NOW)
    token = "at-" + secrets.token_hex(8)
    await store.put_connection(alice.id, "gh", TokenFields(token, "rt-" + token), None, NOW)
    await store.close()
    return alice.id, token


def test_decide() -> None:
    k, other = b"k" * 32, b"o" * 32
    assert decide(0, False, None, k) == "start"
    assert decide(0, True, None, k) == "done"
    assert decide(3, True, None, k) == "reencrypt"
    assert decide(3, False, None, k) == "reencrypt"  # rows under keys nobody has: reported
    assert decide(0, True, other, k) == "start"
    assert decide(3, True, k, k) == "reencrypt"  # --new-key naming the current key


async def test_a_whole_rotation(backend: Backend, open_store: StoreFactory, run: Run,
                                config_for: Callable[..., Config]) -> None:
    k1 = generate_key()
    alice, token = await seed(open_store, k1)
    dump_before = await backend.dump()

    started = await run(config_for(k1))
    assert started.code == 0, started.err
    k2 = started.last_line
    assert len(decode_key(k2)) == 32 and k2 != k1
    assert "encryption_keys_old" in started.out and "rotate-key" in started.out
    for secret in (k1, token):
        assert secret not in started.out + started.err
    # Nothing was re-encrypted: instances do not know the new key yet. The gateway-key HMAC
    # secret is now pinned to what the old key derived, so gateway keys survive the switch.
    assert (await (await open_store(SecretBox(decode_key(k1)))).get_connection(alice, "gh")
            ) is not None
    assert await backend.count("server_secrets") == 1
    assert dump_before != await backend.dump()

    switched = config_for(k2, [k1])
    status = await run(switched, "--status")
    assert status.code == 0 and status.out.startswith("2 stored rows"), status.out
    rotated = await run(switched, "--batch", "1")
    assert rotated.code == 0, rotated.err
    assert "Re-encrypted 2 stored rows" in rotated.out
    assert "remove encryption_keys_old" in rotated.out
    for secret in (k1, k2, token):
        assert secret not in rotated.out + rotated.err

    new_only = await open_store(SecretBox(decode_key(k2)))
    conn = await new_only.get_connection(alice, "gh")
    assert conn is not None and conn.tokens.access_token == token
    pinned = await api_key_mac(new_only, SecretBox(decode_key(k2)))
    assert pinned == derive(decode_key(k1), "api-key")
    assert token.encode() not in await backend.dump()

    again = await run(switched)
    assert again.code == 0 and "nothing to re-encrypt" in again.out
    assert "encryption_keys_old is no longer needed" in again.out
    assert (await run(switched, "--status")).out.startswith("0 stored rows")


async def test_new_key_given_is_never_printed(backend: Backend, open_store: StoreFactory,
                                              run: Run,
                                              config_for: Callable[..., Config]) -> None:
    k1, mine = generate_key(), generate_key()
    await seed(open_store, k1)
    for args, stdin in ((["--new-key", mine], ""), (["--new-key", "-"], mine + "\n")):
        result = await run(config_for(k1), *args, stdin=stdin)
        assert result.code == 0, result.err
        assert "the key given with --new-key" in result.out
        assert mine not in result.out + result.err and k1 not in result.out
    rows = await backend.fetch("SELECT name FROM server_secrets")
    assert [r[0] for r in rows] == [API_KEY_SECRET]


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (["--new-key", "not-a-key"], "", "--new-key: must be 32 bytes"),
    (["--new-key", "-"], "", "--new-key -: standard input held no key"),
    (["--batch", "0"], "", "--batch"),
    (["--batch", "many"], "", "--batch"),
])
async def test_bad_input_changes_nothing(backend: Backend, open_store: StoreFactory, run: Run,
                                         config_for: Callable[..., Config], args: list[str],
                                         stdin: str, message: str) -> None:
    k1, k2 = generate_key(), generate_key()
    await seed(open_store, k1)
    before = await backend.dump()
    result = await run(config_for(k2, [k1]), *args, stdin=stdin)
    assert result.code == 2
    assert message in result.err.strip().splitlines()[-1], result.err  # (argparse adds usage)
    assert await backend.dump() == before


async def test_rows_under_a_dropped_key_fail_the_run(backend: Backend, open_store: StoreFactory,
                                                     run: Run,
                                                     config_for: Callable[..., Config]) -> None:
    k0, k1, k2 = generate_key(), generate_key(), generate_key()
    await seed(open_store, k0)  # k0 is in nobody's config any more
    result = await run(config_for(k2, [k1]))
    assert result.code == 1
    assert "1 rows hold a secret that no configured key can decrypt" in result.err
    assert "remove encryption_keys_old" not in result.out


async def test_an_unreachable_store_is_a_runtime_failure(run: Run, write_config: Any) -> None:
    cfg = write_config({"store": {"url": "postgresql://nobody@127.0.0.1:1/none"}})
    result = await run(cfg)
    assert result.code == 1 and "cannot open the store" in result.err
