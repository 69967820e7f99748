"""Prometheus metrics, served at ``/_gateway/metrics`` in the text exposition format.

Every metric is declared once here, and ``docs/operations.md`` documents each one.

Label values are chosen by the gateway, never copied from a request: a provider label is
the name of a *configured* provider (``_unknown`` for a path naming none, ``_gateway`` for
the gateway's own pages), a method is one of the standard methods (else ``OTHER``).
So a client cannot grow the number of series, and no token, key or code can become a
label. Identity names appear only with ``metrics.identity_labels: true``.

With ``--workers N`` the serving supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory before starting the workers; each worker then writes its values to memory-mapped
files there and any worker answering a scrape sums every worker's files (prometheus_client's
multi-process mode). The in-flight gauge uses the ``livesum`` mode, so a dead worker's
requests stop counting; counters and histograms keep what dead workers counted, as
Prometheus expects of counters.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
GATEWAY_LABEL = "_gateway"
UNKNOWN_LABEL = "_unknown"
# Seconds: sub-10 ms local hops up to the default 60 s read timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def status_class(status: int) -> str:
    """``2xx`` .. ``5xx``; anything else (e.g. 101) by its first digit too."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def method_label(method: str) -> str:
    return method if method in METHODS else "OTHER"


class Metrics:
    """The gateway's metric families, in their own registry (several apps can share a
    process in tests), or written to the multi-process directory when one is set."""

    def __init__(self, *, identity_labels: bool = False,
                 providers: Callable[[], Mapping[str, object]] = dict) -> None:
        self.identity_labels = identity_labels
        self._providers = providers
        # prometheus_client decides on multi-process storage from this variable alone.
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        # In multi-process mode values live in files; registering the families would make
        # a scrape report this process's values twice.
        self._registry = CollectorRegistry(auto_describe=True)
        reg = None if self.multiprocess_dir else self._registry
        who = ("identity",) if identity_labels else ()
        self.requests = Counter(
            "gateway_requests_total", "Requests answered, by provider, method and status class.",
            ("provider", "method", "status_class", *who), registry=reg)
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from receiving a request to the end of the gateway's handling of it "
            "(proxied bodies included).", ("provider",), buckets=LATENCY_BUCKETS, registry=reg)
        self.upstream_latency = Histogram(
            "gateway_upstream_latency_seconds",
            "Time from sending a proxied request upstream to receiving the upstream's "
            "response headers.", ("provider",), buckets=LATENCY_BUCKETS, registry=reg)
        self.refreshes = Counter(
            "gateway_token_refreshes_total",
            "Token-endpoint refreshes, by provider and outcome "
            "(ok, failed, reconsent_required).", ("provider", "outcome", *who), registry=reg)
        self.consent = Counter(
            "gateway_consent_total",
            "Consent (authorization-code) flows, by provider and stage "
            "(started, completed, failed).", ("provider", "stage"), registry=reg)
        self.token_cache = Counter(
            "gateway_token_cache_total",
            "Lookups in the per-process token cache, by provider and result (hit, miss).",
            ("provider", "result"), registry=reg)
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being handled right now (all workers).",
            registry=reg, multiprocess_mode="livesum")
        self.rate_limited = Counter(
            "gateway_rate_limited_total", "Requests refused with 429 by the per-identity limit.",
            who, registry=reg)
        self.reloads = Counter(
            "gateway_config_reloads_total",
            "Configuration reloads (SIGHUP), by outcome (ok, refused).", ("outcome",),
            registry=reg)

    # ------------------------------------------------------------------ labels

    def provider_label(self, name: str | None) -> str:
        """A configured provider's name, else ``_unknown`` (never a client's free text)."""
        return name if name is not None and name in self._providers() else UNKNOWN_LABEL

    def _who(self, identity: str | None) -> tuple[str, ...]:
        return (identity or "",) if self.identity_labels else ()

    # ------------------------------------------------------------------ hooks

    def request_done(self, provider: str, method: str, status: int, seconds: float,
                     identity: str | None) -> None:
        self.requests.labels(provider, method_label(method), status_class(status),
                             *self._who(identity)).inc()
        self.request_duration.labels(provider).observe(seconds)

    def upstream_answered(self, provider: str, seconds: float) -> None:
        self.upstream_latency.labels(self.provider_label(provider)).observe(seconds)

    def token_event(self, kind: str, identity: str, provider: str, outcome: str) -> None:
        """``TokenManager(on_event=...)``."""
        self.refreshes.labels(self.provider_label(provider), outcome,
                              *self._who(identity)).inc()

    def consent_event(self, kind: str, identity: str | None, provider: str | None,
                      outcome: str) -> None:
        """``ConsentFlow(on_event=...)``: kinds ``consent.started|completed|failed``."""
        stage = kind.rpartition(".")[2]
        if stage in ("started", "completed", "failed"):
            self.consent.labels(self.provider_label(provider), stage).inc()

    def cache_lookup(self, provider: str, hit: bool) -> None:
        """``TokenManager(on_cache=...)``."""
        self.token_cache.labels(self.provider_label(provider), "hit" if hit else "miss").inc()

    def limited(self, identity: str | None) -> None:
        who = self._who(identity)
        (self.rate_limited.labels(*who) if who else self.rate_limited).inc()

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "refused").inc()

    # ------------------------------------------------------------------ exposition

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape: this process, or every worker's files."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            _WorkerFiles(registry, path=self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self._registry), CONTENT_TYPE_LATEST


class _WorkerFiles(MultiProcessCollector):
    """prometheus_client's collector, minus a race: a worker creating a metrics file leaves
    it empty for a moment (reading it then fails), and a dead worker's live-gauge files may
    vanish. Such files hold nothing yet, or nothing any more: skip them."""

    def collect(self) -> Any:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(OSError):
                if os.path.getsize(path) >= 8:  # sizes only grow while the file exists
                    files.append(path)
        return self.merge(files, accumulate=True)


def mark_worker_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live-gauge files (its counters stay: they are history)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)
