"""Gateway configs and seeded SQLite stores for the benchmarks.

A store holds the ``bench`` identity (its key is what wrk sends) connected to the ``bench``
provider (in front of the origin) and the ``stream`` provider (in front of the streaming
upstream) with tokens valid for a day; optionally ``storm-*`` identities whose tokens,
minted by the token server, expired a minute ago; optionally bulk identities, each with a
key and a connection, up to ``identities`` in all.

Bulk rows go in with ``executemany`` through the store's own writer connection, 10,000 per
transaction, sealed with the store's codec and hashed with the identity service's key
hash, so they are exactly what the gateway would have written. The public API path
(``add_identity`` + ``put_connection``: three transactions, each with a full fsync) is
timed on a sample in a scratch database, so the report can say why the bulk path exists.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config import load_config
from gateway.identities import IdentityService, key_prefix, new_api_key
from gateway.store import _codec as codec
from gateway.store import create_store
from gateway.store.base import TokenFields
from gateway.store.sqlite import SqliteStore
from gateway.tokens.crypto import SecretBox, box_from_config, generate_key
from tests.fakes.authserver import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

BATCH = 10_000
DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Ports:
    origin: int  # nginx origin (small answers)
    stream: int  # Python streaming upstream
    token: int  # token server


@dataclass(frozen=True, slots=True)
class Seeded:
    """What a seeded store gives the benchmarks (keys are secrets of a throwaway store)."""

    key: str  # the bench identity's gateway key
    storm_keys: dict[str, str]
    keys_file: Path | None  # every identity's key, one per line
    identities: int
    bulk_seconds: float


def write_config(folder: Path, port: int, ports: Ports, encryption_key: str,
                 store: Path) -> Path:
    """A gateway config in ``folder`` (its pidfile goes there too)."""
    folder.mkdir(parents=True, exist_ok=True)
    token = f"http://127.0.0.1:{ports.token}"
    provider = {"authorize_url": f"{token}/authorize", "token_url": f"{token}/token",
                "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET,
                "client_auth": "client_secret_basic"}
    data = {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}",
                   "max_body_bytes": 4 * 2**30, "read_timeout": 120, "shutdown_grace": 3,
                   # The storm sends 1,000 requests at once for one identity; the default
                   # per-identity limit (256 in flight per worker) would answer most with 429.
                   "max_concurrent_per_identity": 4096},
        "store": {"url": f"sqlite:///{store}"},  # an absolute path: four slashes
        "encryption_key": encryption_key,
        "providers": {
            "bench": {**provider, "upstream": f"http://127.0.0.1:{ports.origin}/api"},
            "stream": {**provider, "upstream": f"http://127.0.0.1:{ports.stream}/api"},
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def new_encryption_key() -> str:
    return generate_key()


def mint(token_port: int, subject: str) -> dict[str, Any]:
    """Fresh tokens from the token server, as after a completed consent."""
    req = urllib.request.Request(f"http://127.0.0.1:{token_port}/bench/mint?subject={subject}",
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(json.loads(resp.read()))


async def seed(config_path: Path, *, identities: int = 1, storm: Sequence[str] = (),
               token_port: int | None = None, keys_file: Path | None = None) -> Seeded:
    """Fill the store named by ``config_path`` (see the module docstring)."""
    cfg = load_config(config_path)
    box = box_from_config(cfg.encryption_key, cfg.encryption_key_file)
    store = create_store(cfg.store, box)
    await store.open()
    try:
        service = IdentityService(store, box)
        now = time.time()
        identity, key = await service.add_identity("bench")
        for provider in ("bench", "stream"):
            await store.put_connection(identity.id, provider, TokenFields(
                access_token=f"bench-{provider}-access", refresh_token="bench-refresh",
                expires_at=now + DAY), None, now)
        storm_keys = {}
        for name in storm:
            assert token_port is not None, "storm identities need the token server"
            minted = await asyncio.to_thread(mint, token_port, name)
            ident, storm_keys[name] = await service.add_identity(name)
            await store.put_connection(ident.id, "bench", TokenFields(
                access_token=minted["access_token"], refresh_token=minted["refresh_token"],
                expires_at=now - 60), None, now)
        keys = [key, *storm_keys.values()]
        bulk = identities - len(keys)
        t0 = time.perf_counter()
        if bulk > 0:
            assert isinstance(store, SqliteStore), "bulk seeding is written for SQLite"
            keys += await _bulk(store, box, service, bulk, now)
        bulk_seconds = time.perf_counter() - t0
        if keys_file is not None:
            await asyncio.to_thread(keys_file.write_text, "\n".join(keys) + "\n")
        return Seeded(key, storm_keys, keys_file, len(keys), round(bulk_seconds, 2))
    finally:
        await store.close()


async def _bulk(store: SqliteStore, box: SecretBox, service: IdentityService, n: int,
                now: float) -> list[str]:
    keys: list[str] = []
    async with store._read() as db:  # the bulk identities take the ids after the last one
        rows = await db.fetch("SELECT COALESCE(MAX(id), 0) AS top FROM identities")
    first = int(rows[0]["top"]) + 1
    for start in range(first, first + n, BATCH):
        ids = range(start, min(start + BATCH, first + n))
        batch_keys = [new_api_key() for _ in ids]
        sealed = [codec.seal_tokens(box, i, "bench", TokenFields(
            access_token=f"bulk-access-{i}", refresh_token=f"bulk-refresh-{i}",
            expires_at=now + DAY)) for i in ids]
        async with store._write() as db:
            await db.executemany(
                "INSERT INTO identities (id, name, password_hash, created_at) "
                "VALUES (?, ?, NULL, ?)", [(i, f"user{i:06d}", now) for i in ids])
            await db.executemany(
                "INSERT INTO api_keys (identity_id, key_hash, prefix, created_at) "
                "VALUES (?, ?, ?, ?)",
                [(i, service.hash_key(k), key_prefix(k), now) for i, k in zip(ids, batch_keys,
                                                                             strict=True)])
            await db.executemany(
                "INSERT INTO connections (identity_id, provider, access_token, refresh_token, "
                "token_type, expires_at, scopes, extra, account_id, status, version, "
                "created_at, updated_at, refreshed_at) "
                "VALUES (?, 'bench', ?, ?, ?, ?, ?, ?, NULL, 'active', 1, ?, ?, NULL)",
                [(i, s.access_token, s.refresh_token, s.token_type, s.expires_at, s.scopes,
                  s.extra, now, now) for i, s in zip(ids, sealed, strict=True)])
        keys += batch_keys
    return keys


async def time_api_path(folder: Path, encryption_key: str, n: int = 200) -> float:
    """Seconds per identity (identity + key + connection) through the public store API, in a
    scratch database."""
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    box = box_from_config(encryption_key, None)
    store = SqliteStore(folder / "api-sample.db", box)
    await store.open()
    try:
        service = IdentityService(store, box)
        t0 = time.perf_counter()
        for i in range(n):
            identity, _ = await service.add_identity(f"sample{i:05d}")
            await store.put_connection(identity.id, "bench", TokenFields(
                access_token=f"a{i}", refresh_token=f"r{i}", expires_at=time.time() + DAY),
                None, time.time())
        return (time.perf_counter() - t0) / n
    finally:
        await store.close()
