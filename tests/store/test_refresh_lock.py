"""``refresh_lock`` on every backend: exclusive across coroutines, store instances and OS
processes; bounded by its timeout; never leaked by cancellation, errors or a dying holder.

Synchronisation is by events, tasks and pipes; the only timeouts are the lock's own, used to
prove that a lock is *not* available.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.store.base import Store
from tests.store.conftest import Backend, lock_holder

BUSY = 0.05  # a timeout that must expire: the lock is held elsewhere
LONG = 20.0  # a timeout that must not expire


async def attempt(store: Store, wait: float = 0, identity_id: int = 1,
                  provider: str = "gh") -> bool:
    """Whether the lock could be taken within ``wait`` seconds (released right away)."""
    async with store.refresh_lock(identity_id, provider, wait) as held:
        return held


async def test_exclusive_between_coroutines(store: Store) -> None:
    order: list[str] = []
    got_it = asyncio.Event()

    async def waiter() -> bool:
        async with store.refresh_lock(1, "gh", LONG) as held:
            order.append("waiter in")
            got_it.set()
            return held

    async with store.refresh_lock(1, "gh", LONG) as held:
        assert held
        task = asyncio.create_task(waiter())
        async with store.refresh_lock(1, "gh", BUSY) as second:
            assert second is False
        assert not got_it.is_set()
        # Other keys are independent, and a free lock is taken even with timeout 0.
        assert await attempt(store, 0, 1, "other") and await attempt(store, 0, 2)
        order.append("holder out")
    assert await task is True
    assert order == ["holder out", "waiter in"]
    assert await attempt(store)


async def test_exclusive_between_store_instances(store: Store, other_store: Store) -> None:
    inside = peak = entered = 0

    async def worker(mine: Store, theirs: Store) -> None:
        nonlocal inside, peak, entered
        async with mine.refresh_lock(7, "gh", LONG) as held:
            assert held
            inside += 1
            entered += 1
            peak = max(peak, inside)
            # Real I/O lets every other worker progress meanwhile; none may get in.
            assert await attempt(theirs, 0, 7) is False
            await theirs.ping()
            inside -= 1

    await asyncio.gather(*(worker(a, b) for a, b in [(store, other_store),
                                                      (other_store, store)] * 5))
    assert (peak, entered) == (1, 10)


async def test_cancelled_waiter_and_holder_leak_nothing(store: Store) -> None:
    holding = asyncio.Event()
    forever = asyncio.Event()

    async def hold() -> None:
        async with store.refresh_lock(1, "gh", LONG) as held:
            assert held
            holding.set()
            await forever.wait()

    holder = asyncio.create_task(hold())
    await holding.wait()
    waiter = asyncio.create_task(attempt(store, LONG))
    assert await attempt(store, BUSY) is False  # held; the waiter is queued meanwhile
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert await attempt(store)


async def test_cancelled_waiter_in_another_instance_leaks_nothing(store: Store,
                                                                  other_store: Store) -> None:
    # The waiter sits in the cross-process wait (flock polling, pg_advisory_lock) when it is
    # cancelled; whatever point it reached, neither instance may end up holding the lock.
    async with store.refresh_lock(1, "gh", LONG) as held:
        assert held
        waiter = asyncio.create_task(attempt(other_store, LONG))
        assert await attempt(other_store, BUSY) is False
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert await attempt(other_store) and await attempt(store)


async def test_error_in_the_body_releases(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with store.refresh_lock(1, "gh", LONG) as held:
            assert held
            raise RuntimeError("boom")
    assert await attempt(store)


async def test_exclusive_between_processes(backend: Backend, store: Store) -> None:
    async with lock_holder(backend, 3, "gh") as holder:
        assert await attempt(store, BUSY, 3) is False
        waiter = asyncio.create_task(attempt(store, LONG, 3))
        assert await attempt(store, 0, 4) is True  # another key is free
        assert not waiter.done()
        assert await holder.release() == "released"
        assert await waiter is True
        assert holder.proc.returncode == 0


async def test_a_killed_holder_releases_its_lock(backend: Backend, store: Store) -> None:
    async with lock_holder(backend, 5, "gh") as holder:
        assert await attempt(store, BUSY, 5) is False
        holder.proc.kill()
        await holder.proc.wait()
        assert await attempt(store, LONG, 5) is True
