"""The audit trail: who did what to which connection or key, when, and how it went.

Events are rows in the store (:class:`~gateway.store.base.AuditEvent`: time, kind,
outcome, identity, provider, detail), kept for ``audit_retention_days`` (housekeeping
purges older ones). Kinds written by the gateway::

    connection.created            consent completed, tokens stored          ok
    consent.failed                a consent callback that stored nothing    failed
    connection.refreshed          a token-endpoint refresh succeeded        ok
    connection.refresh_failed     it failed (transiently or not)            failed
    connection.reconsent_required the refresh token was refused             reconsent_required
    connection.revoked            admin API, CLI or dashboard disconnect    ok | not_at_provider
    identity.created / identity.removed, key.created / key.revoked,
    password.changed / password.cleared       (gateway.identities)         ok
    login.succeeded / login.failed            (the web console)            ok | failed

Hooks called on the request path (the token manager's and the consent flow's ``on_event``)
must not wait for the store, so :meth:`AuditLog.record` only queues; a background task
(:meth:`AuditLog.run`) writes the queue, and :meth:`AuditLog.flush` writes it now (on
shutdown, before answering an audit query). No event ever carries a secret: details are
key prefixes and notes written by the gateway itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.errors import BadRequest
from gateway.store.base import AuditEvent, Store

log = logging.getLogger("gateway.audit")

CONNECTION_CREATED = "connection.created"
CONSENT_FAILED = "consent.failed"
CONNECTION_REFRESHED = "connection.refreshed"
CONNECTION_REFRESH_FAILED = "connection.refresh_failed"
CONNECTION_RECONSENT = "connection.reconsent_required"
CONNECTION_REVOKED = "connection.revoked"
_REFRESH_KINDS = {"ok": CONNECTION_REFRESHED, "failed": CONNECTION_REFRESH_FAILED,
                  "reconsent_required": CONNECTION_RECONSENT}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
RETRY_DELAY = 5.0


@dataclass(frozen=True, slots=True)
class _Pending:
    event: AuditEvent
    identity_id: int | None = None  # resolved to a name when written


def parse_since(text: str, now: float) -> float:
    """``--since`` / ``?since=``: ISO-8601 (``2024-05-01``, ``2024-05-01T12:00:00Z``;
    no offset means UTC) or a duration back from now (``90s``, ``15m``, ``24h``, ``7d``,
    ``2w``). Raises BadRequest naming what is accepted."""
    value = text.strip()
    m = _RELATIVE.fullmatch(value)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2).lower()]
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"since: {text!r} is neither an ISO-8601 time (2024-05-01T12:00:00Z) "
                         "nor a duration like 30m, 24h or 7d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def retention_cutoff(now: float, retention_days: float | None) -> float | None:
    """Audit rows older than this may be purged (None: keep everything)."""
    if retention_days is None or retention_days <= 0:
        return None
    return now - retention_days * 86400


class AuditLog:
    """Queues events from synchronous hooks and writes them to the store in the background."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time, *,
                 max_pending: int = 10_000) -> None:
        self._store = store
        self._clock = clock
        self._pending: deque[_Pending] = deque()
        self._max = max_pending
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.dropped = 0

    # ------------------------------------------------------------------ recording

    def record(self, kind: str, outcome: str, *, identity: str | None = None,
               identity_id: int | None = None, provider: str | None = None,
               detail: str | None = None) -> None:
        """Queue an event now (never blocks; the oldest is dropped past ``max_pending``)."""
        event = AuditEvent(at=self._clock(), kind=kind, outcome=outcome, identity=identity,
                           provider=provider, detail=detail)
        self._pending.append(_Pending(event, identity_id))
        if len(self._pending) > self._max:
            self._pending.popleft()
            self.dropped += 1
        self._wake.set()

    async def write(self, kind: str, outcome: str, *, identity: str | None = None,
                    provider: str | None = None, detail: str | None = None) -> None:
        """Record and write at once (for the CLI, which has no background task)."""
        self.record(kind, outcome, identity=identity, provider=provider, detail=detail)
        await self.flush()

    def token_event(self, kind: str, identity: str, provider: str, outcome: str) -> None:
        """``TokenManager(on_event=...)``: refresh outcomes."""
        self.record(_REFRESH_KINDS.get(outcome, CONNECTION_REFRESH_FAILED), outcome,
                    identity=identity, provider=provider)

    def consent_event(self, kind: str, identity: str | None, provider: str | None,
                      outcome: str) -> None:
        """``ConsentFlow(on_event=...)``: a completed flow created (or replaced) a connection."""
        if kind == "consent.completed":
            self.record(CONNECTION_CREATED, "ok", identity=identity, provider=provider)
        elif kind == "consent.failed":
            self.record(CONSENT_FAILED, "failed", identity=identity, provider=provider)

    # ------------------------------------------------------------------ writing

    async def flush(self) -> int:
        """Write everything queued; on a store failure the events stay queued."""
        async with self._lock:
            written = 0
            while self._pending:
                item = self._pending[0]
                event = item.event
                if event.identity is None and item.identity_id is not None:
                    found = await self._store.get_identity_by_id(item.identity_id)
                    event = AuditEvent(at=event.at, kind=event.kind, outcome=event.outcome,
                                       identity=found.name if found else f"#{item.identity_id}",
                                       provider=event.provider, detail=event.detail)
                await self._store.add_audit(event)
                if self._pending and self._pending[0] is item:
                    self._pending.popleft()
                written += 1
            return written

    async def run(self) -> None:
        """The background writer (cancel it to stop; call :meth:`flush` afterwards)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as e:  # the store is down: keep the queue, try again later
                log.warning("could not write audit events (%d queued): %s; retrying",
                            len(self._pending), type(e).__name__)
                await asyncio.sleep(RETRY_DELAY)
                self._wake.set()
            if self.dropped:
                log.warning("dropped %d audit events (queue full)", self.dropped)
                self.dropped = 0

    async def query(self, identity: str | None = None, since: float | None = None,
                    limit: int = 1000) -> Sequence[AuditEvent]:
        """Stored events (newest first as the store returns them), queued ones included."""
        await self.flush()
        return await self._store.list_audit(identity=identity, since=since, limit=limit)
