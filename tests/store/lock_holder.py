"""Run by the lock tests as a separate OS process.

Opens the store named by the JSON spec in argv[1], takes ``refresh_lock``, prints ``held``,
and keeps the lock until a line arrives on stdin (or the test kills this process); then
prints ``released``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from gateway.store.base import Store
from gateway.tokens.crypto import SecretBox


def _store(spec: dict[str, Any]) -> Store:
    box = SecretBox(secrets.token_bytes(32))  # locking never decrypts anything
    if spec["kind"] == "sqlite":
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(Path(spec["path"]), box)
    from gateway.store.postgres import PostgresStore

    return PostgresStore(spec["url"], box, min_size=1, max_size=1, lock_pool_size=1)


async def main(spec: dict[str, Any]) -> None:
    store = _store(spec)
    await store.open()
    try:
        async with store.refresh_lock(spec["identity_id"], spec["provider"], 30.0) as held:
            print("held" if held else "not held", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print("released", flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
