"""Identities, passwords and API keys against a real SQLite store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import identities
from gateway.config import parse_store_url
from gateway.errors import BadRequest
from gateway.identities import (
    IdentityService,
    check_password,
    hash_password,
    key_prefix,
    looks_like_key,
    new_api_key,
)
from gateway.store import create_store
from gateway.store.base import Store
from gateway.tokens.crypto import SecretBox, generate_key

PASSWORD = "correct horse battery"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Spy:
    """The real store, with call counts, injectable failures (``fail``: method names) and
    gates (``hold[name]``: the call completes in the store, then waits for the event)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls: dict[str, int] = {}
        self.fail: set[str] = set()
        self.hold: dict[str, asyncio.Event] = {}
        self.held = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.fail:
                raise OSError(f"{name}: disk on fire")
            result = await attr(*args, **kwargs)
            if name in self.hold:
                self.held.set()
                await self.hold[name].wait()
            return result

        return call


@pytest.fixture
def box() -> SecretBox:
    raw = generate_key()
    return SecretBox(base64.urlsafe_b64decode(raw + "="))


@pytest.fixture
async def store(tmp_path: Path, box: SecretBox) -> AsyncIterator[Store]:
    s = create_store(parse_store_url("sqlite:///gw.db", tmp_path), box)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spy(store: Store) -> Spy:
    return Spy(store)


@pytest.fixture
def service(spy: Spy, box: SecretBox, clock: Clock) -> IdentityService:
    return IdentityService(spy, box, clock)  # type: ignore[arg-type]


def db_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(tmp_path.glob("gw.db*")) if p.is_file())


# --------------------------------------------------------------------------- keys (pure)


def test_key_format_and_entropy() -> None:
    keys = [new_api_key() for _ in range(300)]
    assert len(set(keys)) == len(keys)
    bits = 0
    for key in keys:
        assert looks_like_key(key), key
        assert len(key) == 47 and key.startswith("gwk_")
        raw = base64.urlsafe_b64decode(key[4:] + "=")
        assert len(raw) == 32  # 256 bits
        bits += sum(bin(b).count("1") for b in raw)
    # 76,800 random bits: the share of ones is 0.5 +- 0.002 (1 sigma); 0.02 is 10 sigma.
    assert abs(bits / (300 * 256) - 0.5) < 0.02
    assert key_prefix(keys[0]) == keys[0][:12] and len(key_prefix(keys[0])) == 12


@pytest.mark.parametrize("text", ["", "gwk_", "gwk_short", "Bearer x", "gwk_" + "A" * 42,
                                  "gwk_" + "A" * 44, "gwk_" + "A" * 42 + "/", "GWK_" + "A" * 43,
                                  "gwk_" + "A" * 43 + "\n"])
def test_malformed_keys_are_not_keys(text: str) -> None:
    assert not looks_like_key(text)


# --------------------------------------------------------------------------- passwords (pure)


def test_password_hash_roundtrip_and_salt() -> None:
    a, b = hash_password(PASSWORD), hash_password(PASSWORD)
    assert a != b  # fresh salt each time
    assert a.startswith(f"scrypt${2**15}$8$1$")
    assert PASSWORD not in a
    assert check_password(PASSWORD, a) and check_password(PASSWORD, b)
    assert not check_password(PASSWORD + "x", a)
    assert not check_password("", a)


def test_password_hash_keeps_its_own_parameters() -> None:
    cheap = hash_password(PASSWORD, n=2**14)
    assert cheap.startswith(f"scrypt${2**14}$")
    assert check_password(PASSWORD, cheap)


@pytest.mark.parametrize("encoded", [
    "", "plain", "scrypt$1$8$1$AAAA$AAAA", "bcrypt$16384$8$1$AAAAAAAA$AAAA",
    f"scrypt${2**30}$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # would need 1 TiB: refused
    f"scrypt${3 * 2**12}$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # N not a power of two
    f"scrypt${2**14}$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAA",  # truncated hash
    f"scrypt${2**14}$x$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
    f"scrypt${2**14}$8$1$!!!$" + "A" * 43,
])
def test_malformed_or_hostile_hashes_never_verify(encoded: str) -> None:
    assert not check_password(PASSWORD, encoded)


# --------------------------------------------------------------------------- service


async def test_add_identity_returns_a_key_that_authenticates(
        service: IdentityService, tmp_path: Path) -> None:
    identity, key = await service.add_identity("alice", PASSWORD)
    assert identity.name == "alice" and looks_like_key(key)
    assert await service.authenticate_key(key) == identity
    assert await service.authenticate_key(new_api_key()) is None
    assert await service.authenticate_key("not a key") is None
    keys = await service.list_keys("alice")
    assert [k.prefix for k in keys] == [key_prefix(key)]


async def test_the_database_never_holds_the_key(service: IdentityService, store: Store,
                                                tmp_path: Path) -> None:
    _, key = await service.add_identity("alice")
    second = await service.add_key("alice")
    data = db_bytes(tmp_path)
    assert data  # the store really wrote something
    for k in (key, second):
        assert k.encode() not in data
        assert k[12:].encode() not in data  # nor its secret part
        assert base64.urlsafe_b64decode(k[4:] + "=") not in data
        # what it does hold is the keyed hash, which only works with our key
        assert service.hash_key(k) != hashlib.sha256(k.encode()).digest()
        found = await store.find_api_key(service.hash_key(k))
        assert found is not None and found[1].name == "alice"
    events = await store.list_audit("alice")
    assert {e.kind for e in events} >= {"identity.created", "key.created"}
    assert all(key not in (e.detail or "") and second not in (e.detail or "") for e in events)


async def test_key_hash_depends_on_the_encryption_key(store: Store) -> None:
    one = IdentityService(store, SecretBox(b"\x01" * 32))
    two = IdentityService(store, SecretBox(b"\x02" * 32))
    key = new_api_key()
    assert one.hash_key(key) != two.hash_key(key)
    _, key = await one.add_identity("alice")
    assert await two.authenticate_key(key) is None


async def test_positive_cache_avoids_the_store_until_it_expires(
        service: IdentityService, spy: Spy, clock: Clock) -> None:
    _, key = await service.add_identity("alice")
    for _ in range(5):
        assert await service.authenticate_key(key) is not None
    assert spy.calls["find_api_key"] == 1
    clock.now += 5.1
    assert await service.authenticate_key(key) is not None
    assert spy.calls["find_api_key"] == 2


async def test_unknown_and_malformed_keys(service: IdentityService, spy: Spy) -> None:
    assert await service.authenticate_key("gwk_tooshort") is None
    assert spy.calls.get("find_api_key", 0) == 0  # malformed: rejected before the store
    unknown = new_api_key()
    assert await service.authenticate_key(unknown) is None
    assert await service.authenticate_key(unknown) is None
    assert spy.calls["find_api_key"] == 2  # negatives are not cached


async def test_concurrent_uncached_lookups_query_the_store_once(
        service: IdentityService, spy: Spy) -> None:
    _, key = await service.add_identity("alice")
    results = await asyncio.gather(*(service.authenticate_key(key) for _ in range(20)))
    assert all(r is not None and r.name == "alice" for r in results)
    assert spy.calls["find_api_key"] == 1


async def test_revocation_through_the_service_is_immediate(service: IdentityService) -> None:
    _, key = await service.add_identity("alice")
    other = await service.add_key("alice")
    assert await service.authenticate_key(key) is not None  # cached now
    await service.revoke_key("alice", key_prefix(key))
    assert await service.authenticate_key(key) is None
    assert await service.authenticate_key(other) is not None
    listed = {k.prefix: k for k in await service.list_keys("alice")}
    assert listed[key_prefix(key)].revoked_at is not None
    assert listed[key_prefix(other)].revoked_at is None


async def test_a_lookup_racing_a_revocation_is_not_cached(service: IdentityService,
                                                          spy: Spy) -> None:
    _, key = await service.add_identity("alice")
    spy.hold["find_api_key"] = gate = asyncio.Event()
    lookup = asyncio.create_task(service.authenticate_key(key))
    await spy.held.wait()  # the store answered "valid"; the answer is in flight
    await service.revoke_key("alice", key_prefix(key))
    gate.set()
    assert await lookup is not None  # the request that arrived first may pass...
    del spy.hold["find_api_key"]
    assert await service.authenticate_key(key) is None  # ...but nothing stale was cached


async def test_revocation_elsewhere_is_honoured_within_the_cache_ttl(
        service: IdentityService, store: Store, box: SecretBox, clock: Clock) -> None:
    _, key = await service.add_identity("alice")
    assert await service.authenticate_key(key) is not None
    other_process = IdentityService(store, box, clock)
    await other_process.revoke_key("alice", key_prefix(key))
    clock.now += 1
    assert await service.authenticate_key(key) is not None  # still cached (bounded staleness)
    clock.now += 5
    assert await service.authenticate_key(key) is None


async def test_removing_an_identity_evicts_and_deletes_its_keys(
        service: IdentityService, store: Store) -> None:
    _, key = await service.add_identity("alice")
    assert await service.authenticate_key(key) is not None
    await service.remove_identity("alice")
    assert await service.authenticate_key(key) is None
    assert await store.find_api_key(service.hash_key(key)) is None
    assert await service.list_identities() == []
    with pytest.raises(BadRequest):
        await service.remove_identity("alice")


async def test_revoke_rejects_bad_or_unknown_prefixes(service: IdentityService) -> None:
    _, key = await service.add_identity("alice")
    for prefix in ("", "gwk_", "abc", key_prefix(new_api_key()), key[:11]):
        with pytest.raises(BadRequest):
            await service.revoke_key("alice", prefix)
    await service.revoke_key("alice", key)  # the whole key is understood too
    with pytest.raises(BadRequest):
        await service.revoke_key("alice", key_prefix(key))  # already revoked
    with pytest.raises(BadRequest):
        await service.revoke_key("bob", key_prefix(key))


async def test_last_used_is_batched_and_flushed(service: IdentityService, spy: Spy,
                                                clock: Clock) -> None:
    _, key = await service.add_identity("alice")
    assert await service.flush_last_used() == 0
    assert spy.calls.get("touch_api_keys", 0) == 0
    await service.authenticate_key(key)
    clock.now += 1
    await service.authenticate_key(key)  # cached hit: still recorded, no store write
    assert (await service.list_keys("alice"))[0].last_used_at is None
    spy.fail.add("touch_api_keys")
    with pytest.raises(OSError):
        await service.flush_last_used()
    spy.fail.clear()
    assert await service.flush_last_used() == 1  # kept for the next flush
    assert (await service.list_keys("alice"))[0].last_used_at == clock.now
    assert await service.flush_last_used() == 0


@pytest.mark.parametrize("name", ["", "-alice", ".x", "a b", "alice!", "a" * 65, "ä",
                                  "../etc", "x\n"])
async def test_invalid_names_are_rejected_and_change_nothing(
        service: IdentityService, spy: Spy, name: str) -> None:
    with pytest.raises(BadRequest):
        await service.add_identity(name)
    assert spy.calls.get("create_identity", 0) == 0
    assert await service.list_identities() == []


@pytest.mark.parametrize("name", ["a", "alice", "bob.smith@example.com", "svc-1_x", "A" * 64])
async def test_valid_names(service: IdentityService, name: str) -> None:
    identity, _ = await service.add_identity(name)
    assert identity.name == name


async def test_duplicate_name_changes_nothing(service: IdentityService, store: Store) -> None:
    first, key = await service.add_identity("alice")
    with pytest.raises(BadRequest, match="already exists"):
        await service.add_identity("alice", PASSWORD)
    assert [i.name for i in await service.list_identities()] == ["alice"]
    assert len(await service.list_keys("alice")) == 1
    assert (await store.get_identity("alice")) == first  # no password was set
    assert await service.authenticate_key(key) is not None


@pytest.mark.parametrize("password", ["", "short", "x" * 1025])
async def test_bad_passwords_are_rejected_and_change_nothing(
        service: IdentityService, password: str) -> None:
    with pytest.raises(BadRequest):
        await service.add_identity("alice", password)
    assert await service.list_identities() == []
    await service.add_identity("alice")
    with pytest.raises(BadRequest):
        await service.set_password("alice", password)
    assert (await service.get_identity("alice")).password_hash is None  # type: ignore[union-attr]


async def test_password_verification(service: IdentityService) -> None:
    await service.add_identity("alice", PASSWORD)
    await service.add_identity("nopw")
    alice = await service.verify_password("alice", PASSWORD)
    assert alice is not None and alice.name == "alice"
    assert await service.verify_password("alice", PASSWORD + "!") is None
    assert await service.verify_password("alice", "") is None
    assert await service.verify_password("nobody", PASSWORD) is None
    assert await service.verify_password("nopw", "") is None
    assert await service.verify_password("bad name!", PASSWORD) is None
    assert await service.verify_password("alice", "x" * 100_000) is None
    await service.set_password("alice", "a new password")
    assert await service.verify_password("alice", PASSWORD) is None
    assert await service.verify_password("alice", "a new password") is not None
    await service.set_password("alice", None)
    assert await service.verify_password("alice", "a new password") is None
    with pytest.raises(BadRequest):
        await service.set_password("nobody", PASSWORD)


def _record_scrypt(monkeypatch: pytest.MonkeyPatch,
                   before: Callable[[], None] = lambda: None) -> list[int]:
    """Wrap hashlib.scrypt (not our code) to record which thread runs each call."""
    threads: list[int] = []
    real = hashlib.scrypt

    def scrypt(*args: Any, **kwargs: Any) -> bytes:
        threads.append(threading.get_ident())
        before()
        return real(*args, **kwargs)

    monkeypatch.setattr(identities.hashlib, "scrypt", scrypt)
    return threads


async def test_unknown_names_cost_a_kdf_run_too(service: IdentityService,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    await service.add_identity("alice", PASSWORD)
    threads = _record_scrypt(monkeypatch)
    await service.verify_password("alice", "wrong password")
    known = len(threads)
    await service.verify_password("nobody", "wrong password")  # dummy hash made once
    await service.verify_password("nobody", "wrong password")
    assert known == 1
    assert len(threads) - known >= 2


async def test_scrypt_runs_off_the_event_loop(service: IdentityService,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The KDF blocks until the event loop sets `release`: if it ran on the loop, the loop
    # could never set it and the wait would time out.
    started, release = threading.Event(), threading.Event()

    def before() -> None:
        started.set()
        if not release.wait(10):
            raise AssertionError("the event loop was blocked while scrypt ran")

    threads = _record_scrypt(monkeypatch, before)
    loop_thread = threading.get_ident()
    task = asyncio.create_task(service.add_identity("alice", PASSWORD))
    assert await asyncio.to_thread(started.wait, 10)
    assert not task.done()
    release.set()  # done by the loop, so the loop was free while the KDF ran
    identity, _ = await task
    verify = asyncio.create_task(service.verify_password("alice", PASSWORD))
    assert await verify == identity
    assert threads and loop_thread not in threads


async def test_failed_key_creation_rolls_back_the_identity(
        service: IdentityService, spy: Spy) -> None:
    spy.fail.add("add_api_key")
    with pytest.raises(OSError):
        await service.add_identity("alice")
    assert await service.list_identities() == []
