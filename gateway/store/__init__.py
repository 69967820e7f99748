"""Persistence: the :class:`Store` protocol and its SQLite and PostgreSQL backends."""

from __future__ import annotations

from gateway.config import StoreConfig
from gateway.errors import ConfigError
from gateway.store.base import Store
from gateway.tokens.crypto import SecretBox

__all__ = ["Store", "create_store"]


def create_store(cfg: StoreConfig, box: SecretBox) -> Store:
    """The backend ``cfg.kind`` names, not yet opened (call ``await store.open()``)."""
    if cfg.kind == "sqlite":
        if cfg.path is None:
            raise ConfigError("store.url", "names no database file")
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(cfg.path, box, busy_timeout=cfg.busy_timeout)
    if cfg.kind == "postgresql":
        from gateway.store.postgres import PostgresStore

        return PostgresStore(cfg.url, box)
    raise ConfigError("store.url", f"unsupported store kind {cfg.kind!r}")
