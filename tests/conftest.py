"""Shared fixtures. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Config, load_config
from gateway.tokens.crypto import generate_key


@pytest.fixture
def encryption_key() -> str:
    return generate_key()


@pytest.fixture
def write_config(tmp_path: Path, encryption_key: str) -> Callable[..., Config]:
    """Write a config.yaml under tmp_path from a dict (merged over sane test defaults) and load it."""

    def make(data: dict[str, Any] | None = None, env: dict[str, str] | None = None,
             name: str = "config.yaml") -> Config:
        base: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": 0, "public_url": "http://127.0.0.1:8080"},
            "store": {"url": "sqlite:///gateway.db"},
            "encryption_key": encryption_key,
            "providers": {},
        }
        for k, v in (data or {}).items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k] = {**base[k], **v}
            else:
                base[k] = v
        path = tmp_path / name
        path.write_text(yaml.safe_dump(base))
        return load_config(path, env=env or {})

    return make
