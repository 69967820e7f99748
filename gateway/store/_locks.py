"""Building blocks for ``Store.refresh_lock``: per-key asyncio locks and host-wide file locks.

Coroutines of one process queue on an :class:`asyncio.Lock` per key first, so only one of them
at a time competes for the cross-process lock (a file lock here, an advisory lock in
PostgreSQL). Every wait is bounded by an absolute ``loop.time()`` deadline, and every path out
(timeout, exception, cancellation) releases what was taken: a lock is only ever marked held
after the acquiring call returned, never while a cancellation is in flight.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import StoreUnavailable

_MAX_POLL = 0.02  # seconds between attempts on a contended file lock


def deadline_after(timeout: float) -> float:
    """An absolute ``loop.time()`` deadline; ``inf`` waits forever."""
    return asyncio.get_running_loop().time() + max(0.0, timeout)


def remaining(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


def lock_digest(identity_id: int, provider: str, namespace: str = "") -> bytes:
    """A stable, filesystem- and SQL-safe identifier for one (identity, provider) pair."""
    return hashlib.sha256(f"gateway/refresh/{namespace}/{identity_id}/{provider}".encode()).digest()


def lock_key64(identity_id: int, provider: str, namespace: str = "") -> int:
    """A signed 64-bit key for ``pg_advisory_lock``. Advisory locks are per database, so the
    namespace (the schema) keeps gateways that share a database in separate schemas apart."""
    return int.from_bytes(lock_digest(identity_id, provider, namespace)[:8], "big", signed=True)


@dataclass(slots=True)
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class KeyedLocks:
    """One asyncio lock per key, forgotten again once nobody holds or awaits it."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, key: str, deadline: float) -> AsyncIterator[bool]:
        """Yield True holding the key's lock, or False if the deadline passed first."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            acquired = await _acquire(entry.lock, deadline)
            try:
                yield acquired
            finally:
                if acquired:
                    entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]


async def _acquire(lock: asyncio.Lock, deadline: float) -> bool:
    """Take ``lock`` by ``deadline``. A free lock is taken even if the deadline is due:
    ``acquire()`` then returns without suspending, before the timeout can fire. A lock that
    was just released to a waiter which has not run yet is *not* free, so it is never waited
    on past the deadline.

    ``asyncio.timeout`` rather than ``wait_for``: ``acquire()`` runs in this task, so it either
    returns holding the lock or raises without it; no window where a result gets lost.
    """
    try:
        async with asyncio.timeout_at(deadline if math.isfinite(deadline) else None):
            return await lock.acquire()
    except TimeoutError:
        return False


@asynccontextmanager
async def file_lock(path: Path, deadline: float) -> AsyncIterator[bool]:
    """Exclusive ``flock`` on ``path`` across processes of this host.

    The kernel drops the lock when the holder's descriptor closes, including when the process
    dies, so a crashed worker never wedges the others. Waiting polls a non-blocking attempt with
    short backoff: a blocking ``flock`` in a thread could not be abandoned on timeout or
    cancellation without leaking a lock taken after we stopped waiting.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:  # the lock folder was removed under us
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreUnavailable(f"cannot open the lock file {path}: {e.strerror}") from None
    try:
        acquired = await _poll_flock(fd, deadline)
        try:
            yield acquired
        finally:
            if acquired:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def _poll_flock(fd: int, deadline: float) -> bool:
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        left = remaining(deadline)
        if left <= 0:
            return False
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, _MAX_POLL)
