"""The in-process half of ``refresh_lock``: per-key asyncio locks bounded by a deadline."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.store._locks import KeyedLocks, lock_key64


async def _yield(times: int = 3) -> None:
    for _ in range(times):  # lets just-created tasks run up to their first wait
        await asyncio.sleep(0)


async def test_a_free_lock_is_taken_even_with_a_due_deadline() -> None:
    locks = KeyedLocks()
    now = asyncio.get_running_loop().time()
    async with locks.hold("k", now - 1) as held:
        assert held
        async with locks.hold("k", now) as second:
            assert second is False
        async with locks.hold("other", now) as other:
            assert other
    assert len(locks) == 0  # entries are forgotten once unused


async def test_a_lock_handed_to_a_waiter_is_not_free() -> None:
    locks = KeyedLocks()
    loop = asyncio.get_running_loop()
    first = locks.hold("k", math.inf)
    assert await first.__aenter__()
    waiter_in, waiter_out = asyncio.Event(), asyncio.Event()

    async def waiter() -> None:
        async with locks.hold("k", math.inf) as held:
            assert held
            waiter_in.set()
            await waiter_out.wait()

    task = asyncio.create_task(waiter())
    await _yield()  # the waiter is now queued on the lock
    await first.__aexit__(None, None, None)  # hands the lock to the waiter, which has not run
    async with asyncio.timeout(5):  # fail fast instead of hanging if the deadline is ignored
        async with locks.hold("k", loop.time()) as held:
            assert held is False
    await waiter_in.wait()
    waiter_out.set()
    await task
    assert len(locks) == 0


async def test_waiting_and_cancellation() -> None:
    locks = KeyedLocks()
    loop = asyncio.get_running_loop()
    async with locks.hold("k", math.inf):
        timed = asyncio.create_task(_try(locks, loop.time() + 0.02))
        cancelled = asyncio.create_task(_try(locks, math.inf))
        await _yield()
        cancelled.cancel()
        assert await timed is False
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    assert await _try(locks, loop.time()) is True
    assert len(locks) == 0


async def _try(locks: KeyedLocks, deadline: float) -> bool:
    async with locks.hold("k", deadline) as held:
        return held


def test_lock_keys_are_stable_and_scoped() -> None:
    assert lock_key64(1, "gh") == lock_key64(1, "gh")
    assert len({lock_key64(1, "gh"), lock_key64(2, "gh"), lock_key64(1, "gl"),
                lock_key64(1, "gh", "other_schema")}) == 4
    assert -(2**63) <= lock_key64(1, "gh") < 2**63
