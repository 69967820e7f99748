"""The database failing under the gateway: locked, read-only, full, killed mid-write.

Each case must end in a clear ``503 store_unavailable`` with Retry-After (quickly: bounded by
``store.busy_timeout``), with a message that names neither the file nor the cause (those go
to the log), with nothing corrupted, and with the gateway recovering by itself once the
fault is gone. A refresh whose new tokens could not be stored keeps them (parked, unused)
and stores them on the next attempt, so a provider that rotated the refresh token does not
cost the user a re-consent (SPEC invariant 6).

How each fault is made, honestly:

* locked/busy: a second ``sqlite3`` connection holds ``BEGIN IMMEDIATE`` on the same file;
* full disk: the database lives on a 2 MiB tmpfs that a filler file then fills (needs
  root/CAP_SYS_ADMIN to mount; skipped otherwise);
* read-only at run time: SQLite's ``PRAGMA query_only`` on the gateway's own writer
  connection, which yields the same ``SQLITE_READONLY`` a read-only file does (a mounted
  filesystem cannot be remounted read-only while the gateway holds files open for writing);
* read-only at start: a real tmpfs remounted read-only before the store opens;
* killed during a write: a separate process refreshing tokens in a loop gets SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from gateway.errors import StoreUnavailable
from gateway.store.sqlite import SqliteStore
from gateway.tokens.crypto import SecretBox, decode_key, generate_key
from tests.security.conftest import PASSWORD, SecureGateway, db_rows, integrity
from tests.security.store_writer import tokens_for

REPO = Path(__file__).resolve().parents[2]
BUSY = 0.3


def _sh(*command: str) -> bool:
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def _mount_tmpfs(where: Path, size: str = "2m") -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(where)], capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _fill(path: Path) -> None:
    """Write ``path`` until the filesystem has no byte left."""
    with path.open("wb", buffering=0) as f:
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e


async def _store_gateway(secure_gateway: Any, db: Path) -> tuple[SecureGateway, Any]:
    gw: SecureGateway = await secure_gateway(
        config={"store": {"url": f"sqlite:///{db}", "busy_timeout": BUSY}})
    await gw.connect_alice(("fake",))
    browser = gw.client()
    assert (await gw.login(browser, "alice", PASSWORD)).status == 303
    return gw, browser


async def _get(gw: SecureGateway, path: str, session: aiohttp.ClientSession | None = None
               ) -> tuple[int, dict[str, str], str, float]:
    started = time.monotonic()
    own = session is None
    s = session or aiohttp.ClientSession()
    try:
        async with s.get(gw.url / path, headers=gw.auth_header, allow_redirects=False) as r:
            return r.status, dict(r.headers), await r.text(), time.monotonic() - started
    finally:
        if own:
            await s.close()


def _assert_store_unavailable(gw: SecureGateway, answer: tuple[int, dict[str, str], str, float]
                              ) -> None:
    status, headers, body, seconds = answer
    assert status == 503, (status, body[:300])
    assert headers.get("Gateway-Error") == "store_unavailable", headers
    assert int(headers["Retry-After"]) >= 1
    assert str(gw.db_path) not in body and "sqlite" not in body.lower(), body
    assert seconds < BUSY + 3.0, seconds  # bounded by busy_timeout, not by a hang


async def _refresh_blocked_then_recovered(gw: SecureGateway, browser: Any, fault_on: Any,
                                          fault_off: Any) -> None:
    """The shared script: a refresh and a consent start fail while the fault is on; reads
    keep working; once off, the parked tokens are stored without a second token call."""
    before = db_rows(gw.db_path, skip=("audit_events", "sessions"))
    gw.clock.advance(7200)  # alice's access token has expired: the next call must refresh
    hits = gw.auth.hits["token"]
    await fault_on()
    try:
        _assert_store_unavailable(gw, await _get(gw, "fake/data"))
        assert gw.auth.hits["token"] == hits + 1  # the provider answered (and rotated)
        hits += 1
        start = await _get(gw, "_gateway/connect/fake", browser)
        _assert_store_unavailable(gw, start)
        ready = await _get(gw, "_gateway/readyz")  # reads still work
        assert ready[0] == 200, ready
        assert db_rows(gw.db_path, skip=("audit_events", "sessions")) == before
    finally:
        await fault_off()
    status, _, body, _ = await _get(gw, "fake/data")
    assert status == 200, body
    assert gw.auth.hits["token"] == hits, "the parked tokens should have been stored instead"
    conn = await gw.services.store.get_connection(1, "fake")
    assert conn is not None and conn.version == 2
    assert gw.auth.is_valid_refresh_token(conn.tokens.refresh_token or "") == "alice"
    assert integrity(gw.db_path) == "ok"


async def test_locked_database_is_503_quickly_and_recovers(secure_gateway: Any,
                                                           tmp_path: Path) -> None:
    gw, browser = await _store_gateway(secure_gateway, tmp_path / "gw.db")
    holder = sqlite3.connect(gw.db_path, isolation_level=None, timeout=0)

    async def lock() -> None:
        holder.execute("BEGIN IMMEDIATE")  # another process writing, for as long as it likes

    async def unlock() -> None:
        holder.execute("ROLLBACK")
        holder.close()

    await _refresh_blocked_then_recovered(gw, browser, lock, unlock)


async def test_read_only_database_is_503_and_recovers(secure_gateway: Any,
                                                      tmp_path: Path) -> None:
    gw, browser = await _store_gateway(secure_gateway, tmp_path / "gw.db")
    writer = cast(SqliteStore, gw.services.store)._wr
    assert writer is not None

    async def read_only() -> None:
        await writer.execute("PRAGMA query_only = ON")

    async def writable() -> None:
        await writer.execute("PRAGMA query_only = OFF")

    await _refresh_blocked_then_recovered(gw, browser, read_only, writable)


async def test_full_disk_is_503_without_corruption_and_recovers(small_disk: Path,
                                                                secure_gateway: Any) -> None:
    gw, browser = await _store_gateway(secure_gateway, small_disk / "gw.db")
    filler = small_disk / "filler"

    async def fill() -> None:
        _fill(filler)

    async def free() -> None:
        filler.unlink()

    await _refresh_blocked_then_recovered(gw, browser, fill, free)


async def test_read_only_filesystem_at_start_is_a_clear_error(tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        box = SecretBox(os.urandom(32))
        store = SqliteStore(mnt / "gw.db", box)
        await store.open()
        await store.create_identity("alice", None, time.time())
        await store.close()
        assert _sh("mount", "-o", "remount,ro", str(mnt))
        with pytest.raises(StoreUnavailable, match="Read-only file system") as caught:
            await SqliteStore(mnt / "gw.db", box).open()
        assert str(mnt / "gw.db") in caught.value.message  # operators get the file...
        assert str(mnt) not in str(caught.value.body())  # ...clients never do
    finally:
        _sh("umount", "-l", str(mnt))


def _writer(db: Path, key: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("store_writer.py")),
                             str(db), key], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def _read_commits(proc: subprocess.Popen[str], count: int) -> int:
    """Read the writer's output until ``count`` commits; the last version it promised."""
    assert proc.stdout is not None
    last = 0
    seen = 0
    while seen < count:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer died: {proc.stderr.read() if proc.stderr else ''}")
        word, _, version = line.partition(" ")
        if word == "committed":
            seen += 1
        last = int(version)
    return last


async def test_sigkill_during_writes_leaves_the_database_intact(tmp_path: Path) -> None:
    db, key = tmp_path / "gw.db", generate_key()
    rng = random.Random(7)
    kills = 6
    for _ in range(kills):
        proc = _writer(db, key)
        try:
            promised = await asyncio.to_thread(_read_commits, proc, rng.randint(20, 200))
        finally:
            proc.send_signal(signal.SIGKILL)  # mid-transaction: it never stops writing
            await asyncio.to_thread(proc.wait)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        assert proc.returncode == -signal.SIGKILL
        assert integrity(db) == "ok"
        store = SqliteStore(db, SecretBox(decode_key(key)))
        await store.open()
        try:
            writer = await store.get_identity("writer")
            assert writer is not None
            conn = await store.get_connection(writer.id, "fake")
            assert conn is not None
            # Durable: every version reported committed is there (maybe one more that had
            # committed but not yet been printed); and it decrypts to exactly what was written.
            assert conn.version in (promised, promised + 1), (conn.version, promised)
            assert conn.tokens == tokens_for(conn.version)
        finally:
            await store.close()
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
