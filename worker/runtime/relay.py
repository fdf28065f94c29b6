"""Delivery events: the relay that publishes the outbox (the ``events`` table) to ``<prefix>.events``.

The ledger writes a job's event in the same transaction as the change it reports
(``postbote_emit_event``); the supervisor runs ``EventRelay.run`` in a thread that claims a batch
of unpublished rows (``FOR UPDATE SKIP LOCKED``, so relays on several hosts share the work),
publishes them in ``id`` order to the durable topic exchange with publisher confirms, marks them
published and commits. A relay that dies between a confirm and its commit leaves the rows
unpublished: they go out again, with the same ``event_id`` (at least once).

A job's events leave in ``seq`` order also with several relays: a relay leaves out the events of
a job whose earlier event another relay still holds. It polls every ``IDLE_POLL_S`` while there
is nothing to do and claims the next batch at once after a full one. Published events older
than ``events_retention_days`` are deleted, ``RETENTION_BATCH`` rows at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pika
import pika.exceptions
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from schemas import constants as names
from schemas.constants import event_routing_key
from schemas.event import Event, EventRecipient, EventType
from worker.db import Connection, connect, translated_errors
from worker.errors import BrokerUnavailable, DatabaseUnavailable
from worker.runtime.event_publisher import EventPublisher
from worker.settings import Settings

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
"""Events claimed, published and marked in one transaction."""
IDLE_POLL_S = 0.15
"""How often an idle relay looks for new events."""
RETENTION_BATCH = 5000
"""Rows one retention pass deletes at most."""
RETENTION_INTERVAL_S = 60.0
"""Time between retention passes (1 s while a pass found a full batch)."""
BATCH_TIME_LIMIT_S = 10.0
"""Publishing a batch stops after this long; what is out is marked, the rest is claimed again."""
MAX_OUTAGE_WAIT_S = 10.0
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

EVENT_COLUMNS = "id, event_id, job_id, seq, type, tenant_id, doc_type, body, occurred_at"
"""The ``events`` columns :meth:`OutboxEvent.from_row` reads."""

_CLAIM = (
    f"SELECT {EVENT_COLUMNS}, clock_timestamp() AS now FROM events WHERE published_at IS NULL"
    " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
_FIRST_NOT_CLAIMED = (
    "SELECT job_id, min(id) AS first FROM events"
    " WHERE published_at IS NULL AND job_id = ANY(%s) AND NOT id = ANY(%s) GROUP BY job_id"
)
_MARK = "UPDATE events SET published_at = clock_timestamp() WHERE id = ANY(%s)"
_EXPIRE = (
    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE published_at IS NOT NULL"
    " AND occurred_at < clock_timestamp() - make_interval(days => %s)"
    # Not before every webhook of the tenant has had it.
    " AND NOT EXISTS (SELECT 1 FROM webhook_cursors c WHERE c.tenant_id = events.tenant_id"
    " AND c.last_event_id < events.id)"
    " ORDER BY occurred_at LIMIT %s FOR UPDATE SKIP LOCKED)"
)
_FIELD_ORDER = tuple(Event.model_fields)
_RECIPIENT_ORDER = tuple(EventRecipient.model_fields)


@dataclass(frozen=True)
class OutboxEvent:
    """One row of the outbox, and the message it becomes."""

    id: int
    event_id: UUID
    job_id: UUID
    seq: int
    type: str
    tenant: str
    doc_type: str
    body: Mapping[str, Any]
    occurred_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> OutboxEvent:
        """The event of a row with ``EVENT_COLUMNS``."""
        return cls(
            id=row["id"],
            event_id=row["event_id"],
            job_id=row["job_id"],
            seq=row["seq"],
            type=row["type"],
            tenant=row["tenant_id"],
            doc_type=row["doc_type"],
            body=row["body"],
            occurred_at=row["occurred_at"],
        )

    @property
    def routing_key(self) -> str:
        return event_routing_key(self.tenant, self.doc_type, self.type)

    def document(self) -> dict[str, Any]:
        """The event as consumers get it (JSON data, ``schemas.event.Event``): the body the ledger
        wrote with ``event_id``, ``seq``, ``type`` and ``occurred_at`` (UTC) in front."""
        out: dict[str, Any] = {
            "event_id": str(self.event_id),
            "seq": self.seq,
            "type": self.type,
            "occurred_at": self.occurred_at.astimezone(UTC).isoformat(),
        }
        body = {"job_id": str(self.job_id), "tenant": self.tenant, **self.body}
        # The schema's order first (jsonb keeps keys sorted by length), then anything newer.
        for key in (*_FIELD_ORDER, *body):
            if key in body and key not in out:
                out[key] = _ordered_recipients(body[key]) if key == "recipients" else body[key]
        return out

    def encode(self) -> bytes:
        return json.dumps(self.document(), ensure_ascii=False, separators=(",", ":")).encode()

    def properties(self) -> pika.BasicProperties:
        return pika.BasicProperties(
            delivery_mode=2,
            content_type="application/json",
            message_id=str(self.event_id),
            type=self.type,
            timestamp=int(self.occurred_at.timestamp()),
            app_id="postbote",
        )


class RelayMetrics:
    """``postbote_events_published_total{type}`` and ``postbote_events_lag_seconds``, as a collector.

    The relay runs in the supervisor, which counts in its own memory and serves the counts with
    the worker processes' metrics; every event type starts at 0, so ``increase()`` sees the first.
    """

    def __init__(self, buckets: Iterable[float] = LAG_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._published = {t.value: 0 for t in EventType}
        self._bounds = sorted(buckets)
        self._buckets = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, event_type: str, lag_s: float) -> None:
        """One event of ``event_type`` published ``lag_s`` seconds after it occurred."""
        with self._lock:
            self._published[event_type] = self._published.get(event_type, 0) + 1
            index = next((i for i, b in enumerate(self._bounds) if lag_s <= b), len(self._bounds))
            self._buckets[index] += 1
            self._sum += lag_s

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            published, buckets, total = dict(self._published), list(self._buckets), self._sum
        family = CounterMetricFamily(
            names.METRIC_EVENTS_PUBLISHED.removesuffix("_total"),
            "Delivery events published to <prefix>.events and confirmed by RabbitMQ, by type.",
            labels=["type"],
        )
        for event_type, count in sorted(published.items()):
            family.add_metric([event_type], count)
        yield family
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self._bounds), "+Inf"], buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            names.METRIC_EVENTS_LAG_SECONDS,
            "Time from a delivery event's ledger change to RabbitMQ's confirm of its publication.",
            buckets=cumulative,
            sum_value=total,
        )


class EventRelay:
    """Publishes the outbox to ``<prefix>.events`` (see the module docstring).

    Parameters:
      settings: database, broker, queue prefix, retention.
      metrics: where published events are counted.
      batch_size: events per transaction.
      idle_poll_s: how often to look for events while there are none.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: RelayMetrics | None = None,
        batch_size: int = BATCH_SIZE,
        idle_poll_s: float = IDLE_POLL_S,
    ) -> None:
        self.metrics = metrics or RelayMetrics()
        self._settings = settings
        self._batch_size = batch_size
        self._idle_poll_s = idle_poll_s
        self._publisher = EventPublisher(
            settings.broker_url, settings.queue_prefix, timeout_s=BATCH_TIME_LIMIT_S
        )
        self._conn: Connection | None = None
        self._problem: str | None = None
        self._backlog = False

    def relay_once(self) -> int:
        """Claim, publish and mark one batch; returns how many events were published.

        Raises:
          DatabaseUnavailable, BrokerUnavailable: an outage; nothing of the batch is marked, what
            was published before it goes out again later.
        """
        conn = self._connection()
        with translated_errors(), conn.transaction():
            conn.execute("SET LOCAL idle_in_transaction_session_timeout = 60000")
            rows = conn.execute(_CLAIM, (self._batch_size,)).fetchall()
            self._backlog = False
            if not rows:
                return 0
            claimed_at, started = rows[0]["now"], time.monotonic()
            events = _in_job_order(conn, [OutboxEvent.from_row(r) for r in rows])
            # A slow broker must not keep the transaction open for long: what it confirmed in
            # time is marked, the rest goes out with the next batch.
            confirmed = self._publisher.publish([(e.routing_key, e.encode(), e.properties()) for e in events])
            published = events[:confirmed]
            at = claimed_at + timedelta(seconds=time.monotonic() - started)
            lags = [(e.type, max(0.0, (at - e.occurred_at).total_seconds())) for e in published]
            if published:
                conn.execute(_MARK, ([e.id for e in published],))
            self._backlog = len(rows) == self._batch_size and len(published) == len(rows)
            self._backlog |= len(published) < len(events)
        for event_type, lag in lags:
            self.metrics.observe(event_type, lag)
        return len(lags)

    def delete_expired(self) -> int:
        """Delete up to ``RETENTION_BATCH`` published events older than the retention; returns how many."""
        days = self._settings.events_retention_days
        if days <= 0:
            return 0
        with translated_errors():
            deleted = self._connection().execute(_EXPIRE, (days, RETENTION_BATCH)).rowcount
        if deleted:
            logger.info("deleted %d published event(s) older than %d days", deleted, days)
        return max(deleted, 0)

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set. Outages of RabbitMQ or PostgreSQL are logged and outlasted
        (waits doubling from 0.5 s to 10 s); anything else propagates, for the supervisor to
        restart the relay."""
        failures = 0
        next_retention = 0.0
        try:
            while not stop.is_set():
                try:
                    self.relay_once()
                    if time.monotonic() >= next_retention:
                        full = self.delete_expired() >= RETENTION_BATCH
                        next_retention = time.monotonic() + (1.0 if full else RETENTION_INTERVAL_S)
                    if not self._backlog:
                        self._publisher.keep_alive()
                except (DatabaseUnavailable, BrokerUnavailable) as e:
                    self._drop(e)
                    failures += 1
                    stop.wait(min(MAX_OUTAGE_WAIT_S, 0.5 * 2.0 ** min(failures - 1, 8)))
                    continue
                failures = 0
                self._report(None)
                if not self._backlog:
                    stop.wait(self._idle_poll_s)
        finally:
            self.close()

    def close(self) -> None:
        self._publisher.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(
                self._settings.database_url,
                autocommit=True,
                statement_timeout_ms=self._settings.statement_timeout_ms,
            )
        return self._conn

    def _drop(self, error: Exception) -> None:
        if isinstance(error, DatabaseUnavailable) and self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
        self._report(str(error) or type(error).__name__)

    def _report(self, problem: str | None) -> None:
        """Log when relaying starts or stops failing, not at every attempt."""
        previous, self._problem = self._problem, problem
        if problem is not None and problem != previous:
            logger.warning("event relay: %s; the events wait in the outbox, retrying", problem)
        elif problem is None and previous is not None:
            logger.info("event relay: publishing again")


def _in_job_order(conn: Connection, events: list[OutboxEvent]) -> list[OutboxEvent]:
    """``events`` without those that would overtake an unpublished event of the same job that
    this batch does not hold (another relay claimed it): they follow once it is published, so a
    job's events stay in ``seq`` order."""
    jobs = list(dict.fromkeys(e.job_id for e in events))
    rows = conn.execute(_FIRST_NOT_CLAIMED, (jobs, [e.id for e in events])).fetchall()
    held = {r["job_id"]: r["first"] for r in rows}
    kept = [e for e in events if e.job_id not in held or e.id < held[e.job_id]]
    if len(kept) < len(events):
        logger.debug(
            "event relay: %d event(s) wait for earlier ones another relay holds", len(events) - len(kept)
        )
    return kept


def _ordered_recipients(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    return [{k: r[k] for k in (*_RECIPIENT_ORDER, *r) if k in r} if isinstance(r, dict) else r for r in value]


__all__ = [
    "BATCH_SIZE",
    "EVENT_COLUMNS",
    "IDLE_POLL_S",
    "LAG_BUCKETS",
    "RETENTION_BATCH",
    "EventRelay",
    "OutboxEvent",
    "RelayMetrics",
]
