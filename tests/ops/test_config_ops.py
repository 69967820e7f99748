"""The operations keys of the config file: admin, metrics, rate_limit, audit_retention_days."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.app import OpsSettings, ops_settings
from gateway.config import AdminConfig, MetricsConfig, RateLimitConfig
from gateway.errors import ConfigError
from gateway.ratelimit import RateLimit
from tests.ops.conftest import ADMIN_KEY


def test_defaults(write_config: Any) -> None:
    cfg = write_config()
    assert cfg.admin == AdminConfig() and cfg.admin.key is None
    assert cfg.metrics == MetricsConfig(identity_labels=False)
    assert cfg.rate_limit is None and cfg.audit_retention_days == 90.0
    assert ops_settings(cfg, env={}) == OpsSettings(admin_key=None, identity_labels=False,
                                                    rate_limit=None, audit_retention_days=90.0)


def test_every_key(write_config: Any) -> None:
    cfg = write_config({"admin": {"key": "${ADMIN}"}, "metrics": {"identity_labels": True},
                        "rate_limit": {"requests_per_second": 2.5, "burst": 7},
                        "audit_retention_days": 0}, env={"ADMIN": ADMIN_KEY})
    assert cfg.admin.key == ADMIN_KEY and ADMIN_KEY not in repr(cfg)
    assert cfg.rate_limit == RateLimitConfig(2.5, 7)
    ops = ops_settings(cfg, env={"GATEWAY_ADMIN_KEY": "b" * 30})
    assert ops == OpsSettings(admin_key=ADMIN_KEY, identity_labels=True,  # config wins
                              rate_limit=RateLimit(2.5, 7), audit_retention_days=None)


def test_burst_defaults_to_one_second_of_requests(write_config: Any) -> None:
    cfg = write_config({"rate_limit": {"requests_per_second": 3.2}})
    assert cfg.rate_limit == RateLimitConfig(3.2, 4)
    assert write_config({"rate_limit": None}).rate_limit is None


def test_admin_key_from_the_environment(write_config: Any) -> None:
    cfg = write_config({"admin": {"key": "${GATEWAY_ADMIN_KEY}"}}, env={})
    assert cfg.admin.key is None  # unset variable: no admin API
    assert ops_settings(cfg, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).admin_key == ADMIN_KEY
    with pytest.raises(ConfigError) as err:
        ops_settings(cfg, env={"GATEWAY_ADMIN_KEY": "short"})
    assert err.value.path == "GATEWAY_ADMIN_KEY" and "short" not in err.value.message


@pytest.mark.parametrize("data, path", [
    ({"admin": {"key": "too-short"}}, "admin.key"),
    ({"admin": {"kee": ADMIN_KEY}}, "admin.kee"),
    ({"admin": "yes"}, "admin"),
    ({"metrics": {"identity_labels": "maybe"}}, "metrics.identity_labels"),
    ({"metrics": {"labels": True}}, "metrics.labels"),
    ({"rate_limit": {"burst": 3}}, "rate_limit.requests_per_second"),
    ({"rate_limit": {"requests_per_second": 0}}, "rate_limit.requests_per_second"),
    ({"rate_limit": {"requests_per_second": "fast"}}, "rate_limit.requests_per_second"),
    ({"rate_limit": {"requests_per_second": float("inf")}}, "rate_limit.requests_per_second"),
    ({"rate_limit": {"requests_per_second": 1, "burst": 0}}, "rate_limit.burst"),
    ({"rate_limit": {"requests_per_second": 1, "burst": 1.5}}, "rate_limit.burst"),
    ({"rate_limit": {"requests_per_second": 1, "per": "identity"}}, "rate_limit.per"),
    ({"audit_retention_days": -1}, "audit_retention_days"),
    ({"audit_retention_days": "forever"}, "audit_retention_days"),
])
def test_bad_values_name_the_key(write_config: Any, data: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        write_config(data)
    assert err.value.path == path
    assert "too-short" not in err.value.message
