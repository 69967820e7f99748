"""Run by tests/security/test_faults_store.py as a separate OS process, to be SIGKILLed.

Opens the SQLite store at argv[1] with the key in argv[2] (base64url), makes sure identity
``writer`` has a ``fake`` connection, then refreshes its tokens in a loop, as fast as it can:
every round is one ``update_tokens`` transaction (plus, every few rounds, a bigger
``put_connection`` and an audit row, so pages split and the WAL grows). After each commit it
prints ``committed <version>``: a version printed is a version the store promised to keep.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from gateway.store.base import AuditEvent, TokenFields
from gateway.store.sqlite import SqliteStore
from gateway.tokens.crypto import SecretBox, decode_key


def tokens_for(version: int) -> TokenFields:
    """What version ``version`` of the connection holds (the test recomputes it)."""
    return TokenFields(access_token=f"at-{version:08d}-" + "a" * 40,
                       refresh_token=f"rt-{version:08d}-" + "r" * 40,
                       expires_at=1_000_000.0 + version, scopes=("read",),
                       extra={"pad": "p" * (version % 7) * 100})


async def main(path: Path, key: str) -> None:
    store = SqliteStore(path, SecretBox(decode_key(key, "key")), busy_timeout=10.0)
    await store.open()
    identity = await store.get_identity("writer")
    if identity is None:
        identity = await store.create_identity("writer", None, time.time())
    conn = await store.get_connection(identity.id, "fake")
    if conn is None:
        conn = await store.put_connection(identity.id, "fake", tokens_for(1), None, time.time())
    print(f"ready {conn.version}", flush=True)
    while True:
        version = conn.version
        if version % 5 == 0:
            await store.add_audit(AuditEvent(at=time.time(), kind="test.write",
                                             outcome="ok", identity=identity.name,
                                             provider="fake", detail="x" * 500))
        new = await store.update_tokens(identity.id, "fake", version, tokens_for(version + 1),
                                        time.time())
        assert new is not None and new.version == version + 1
        conn = new
        print(f"committed {conn.version}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
