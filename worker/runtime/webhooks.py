"""Delivery events over HTTP: every webhook of a tenant gets the tenant's events in the order they
were written, signed the Standard Webhooks way.

The supervisor runs ``deliver_webhooks_forever``. Each webhook has a cursor (``webhook_cursors``:
the last event it was handed); its head event is the next one of the tenant's events it wants.
The head is POSTed until the receiver answers 2xx, and nothing after it goes out before it: a
refused head is tried again after 5 s, 10 s, 20 s … up to ``webhook_max_backoff_ms``, for
``webhook_retry_hours`` from its first failed try. Then it is kept in ``webhook_deliveries`` as
a failed delivery (``postbote events webhooks --failed``, ``--resend``) and the cursor moves on.
Delivery is at least once: a receiver dedupes by the ``webhook-id`` header, the event's id.

Outbox ids are handed out before their transactions commit, so an event with a smaller id can
become visible after a larger one. A cursor only passes ids below the *horizon*: the last id
handed out before every transaction then running had ended (``Horizon``). A transaction left
open on the database holds deliveries back until it ends, as it holds vacuum back.

One sender per webhook at a time, over any number of hosts: a turn holds a transaction-scoped
advisory lock on its own connection (no transaction id, so no other sender's horizon waits for
it; PgBouncer in transaction mode keeps it) while it posts and moves the cursor on another.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from psycopg_pool import ConnectionPool

from schemas import constants as names
from worker.db import Connection, make_pool, storable, translated_errors
from worker.errors import ConfigurationError, DatabaseUnavailable
from worker.logs import printable
from worker.runtime.relay import EVENT_COLUMNS
from worker.runtime.webhook_post import (
    Target,
    event_document,
    open_client,
    post_event,
    shown_url,
    target_signer,
    targets_of,
)
from worker.settings import Settings

logger = logging.getLogger(__name__)

SENDER_THREADS = 4
"""Webhooks a supervisor posts to at once."""
POLL_INTERVAL_S = 0.5
TURN_EVENTS = 100
"""Events one turn posts to one webhook at most before the others get their turn."""
TURN_S = 20.0
"""How long one turn goes on starting new POSTs (it holds the webhook's lock meanwhile)."""
OUTCOMES = ("delivered", "failed", "retrying")
"""The ``outcome`` label of ``postbote_webhook_deliveries_total``."""
_MAX_SAMPLES = 10_000
_CONNECT_S = 10.0
_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('postbote.webhooks'), hashtext(%s)) AS locked"


def track_webhooks(conn: Connection, tenant_id: str, urls: list[str]) -> None:
    """Give each of the tenant's webhooks a cursor after the newest stored event (a new webhook
    gets what is written from now on) and drop the cursors of webhooks no longer configured.
    Runs in the caller's transaction (``postbote tenants apply``)."""
    conn.execute(
        "DELETE FROM webhook_cursors WHERE tenant_id = %s AND NOT (url = ANY(%s))", (tenant_id, urls)
    )
    for url in urls:
        conn.execute(
            "INSERT INTO webhook_cursors (tenant_id, url, last_event_id)"
            " VALUES (%s, %s, (SELECT COALESCE(max(id), 0) FROM events)) ON CONFLICT DO NOTHING",
            (tenant_id, url),
        )


def backoff_ms(settings: Settings, attempts: int) -> int:
    """The wait after the ``attempts``-th failed try of one event: doubling from the minimum."""
    low, high = (
        settings.webhook_min_backoff_ms,
        max(settings.webhook_min_backoff_ms, settings.webhook_max_backoff_ms),
    )
    return int(min(high, low * 2.0 ** min(attempts - 1, 40)))


class Horizon:
    """The largest event id below which no further event can become visible.

    Each reading takes the id last handed out, then a snapshot; that id is final once every
    transaction running at the snapshot has ended (a later snapshot's ``xmin`` reached its
    ``xmax``). ``postbote_emit_event`` locks the job's ledger row before it takes an id, so a
    writer has a transaction id (and shows in snapshots) before its event has one.
    """

    def __init__(self) -> None:
        self._samples: deque[tuple[int, int]] = deque()
        self._safe = 0

    def advance(self, conn: Connection) -> int:
        """Read once more; returns the horizon."""
        with translated_errors():
            last = conn.execute(
                "SELECT COALESCE(pg_sequence_last_value(pg_get_serial_sequence('events', 'id')::regclass), 0)"
                " AS id"
            ).fetchone()
            snap = conn.execute(
                "SELECT pg_snapshot_xmin(s)::text AS xmin, pg_snapshot_xmax(s)::text AS xmax"
                " FROM pg_current_snapshot() AS s"
            ).fetchone()
        assert last is not None and snap is not None
        if len(self._samples) < _MAX_SAMPLES:
            self._samples.append((int(snap["xmax"]), int(last["id"])))
        while self._samples and self._samples[0][0] <= int(snap["xmin"]):
            self._safe = max(self._safe, self._samples.popleft()[1])
        return self._safe


class WebhookCounts:
    """``postbote_webhook_deliveries_total{tenant,outcome}``, counted by the supervisor.

    ``delivered`` and ``failed`` count events (failed: given up after the retry window),
    ``retrying`` counts refused tries that will be repeated. Every outcome of a tenant starts at
    0 with its first turn, so ``increase()`` sees the first one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def seen(self, tenant_id: str) -> None:
        with self._lock:
            for outcome in OUTCOMES:
                self._counts.setdefault((tenant_id, outcome), 0)

    def add(self, tenant_id: str, outcome: str) -> None:
        with self._lock:
            self._counts[(tenant_id, outcome)] = self._counts.get((tenant_id, outcome), 0) + 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = dict(self._counts)
        family = CounterMetricFamily(
            names.METRIC_WEBHOOK_DELIVERIES.removesuffix("_total"),
            "Delivery events posted to tenants' webhooks: delivered, failed (given up after the retry"
            " window) and retrying (refused tries that will be repeated).",
            labels=["tenant", "outcome"],
        )
        for (tenant_id, outcome), count in sorted(counts.items()):
            family.add_metric([tenant_id, outcome], count)
        yield family


def deliver_webhooks_forever(
    settings: Settings, stop: threading.Event, *, counts: WebhookCounts, interval_s: float = POLL_INTERVAL_S
) -> None:
    """Every ``interval_s`` until ``stop`` is set, give each webhook with events waiting a turn
    (``SENDER_THREADS`` at once). Outages are logged and outlasted; anything else propagates,
    for the supervisor to restart the thread."""
    pool = make_pool(
        settings.database_url,
        max_size=2 * SENDER_THREADS + 1,
        statement_timeout_ms=settings.statement_timeout_ms,
    )
    horizon = Horizon()
    busy: set[tuple[str, str]] = set()
    busy_lock = threading.Lock()
    executor = ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="webhooks")

    def finished(key: tuple[str, str], future: Future[None]) -> None:
        with busy_lock:
            busy.discard(key)
        error = future.exception() if not future.cancelled() else None
        if isinstance(error, DatabaseUnavailable):
            logger.info("webhook turn of %s ended early: %s", key[0], error)
        elif error is not None:
            logger.error("webhook turn of %s failed", key[0], exc_info=error)

    outage = False
    try:
        while not stop.wait(interval_s):
            try:
                with translated_errors(), pool.connection(timeout=_CONNECT_S) as conn:
                    safe = horizon.advance(conn)
                    due = _due(conn, safe)
            except DatabaseUnavailable as e:
                if not outage:
                    logger.warning("webhook deliveries wait for the database: %s", e)
                outage = True
                continue
            if outage:
                logger.info("webhook deliveries go on: the database answers again")
                outage = False
            for target in due:
                key = (target.tenant_id, target.url)
                with busy_lock:
                    if key in busy:
                        continue
                    busy.add(key)
                counts.seen(target.tenant_id)
                future = executor.submit(_turn, pool, settings, target, safe, stop, counts)
                future.add_done_callback(functools.partial(finished, key))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        pool.close()


def _due(conn: Connection, safe: int) -> list[Target]:
    """The webhooks not waiting for a retry that have events up to ``safe`` after their cursor."""
    rows = conn.execute(
        "SELECT c.tenant_id, c.url, t.webhooks FROM webhook_cursors c JOIN tenants t ON t.id = c.tenant_id"
        " WHERE (c.next_attempt_at IS NULL OR c.next_attempt_at <= now()) AND EXISTS ("
        "   SELECT 1 FROM events e WHERE e.tenant_id = c.tenant_id AND e.id > c.last_event_id AND e.id <= %s)"
        " ORDER BY c.tenant_id, c.url",
        (safe,),
    ).fetchall()
    due = []
    for row in rows:
        target = targets_of(str(row["tenant_id"]), row["webhooks"]).get(str(row["url"]))
        if target is not None:
            due.append(target)
    return due


def _turn(
    pool: ConnectionPool[Connection],
    settings: Settings,
    target: Target,
    safe: int,
    stop: threading.Event,
    counts: WebhookCounts,
) -> None:
    """Post the webhook's waiting events in order while this turn holds its lock."""
    with translated_errors(), pool.connection(timeout=_CONNECT_S) as holder, holder.transaction():
        locked = holder.execute(_LOCK, (f"{target.tenant_id}\n{target.url}",)).fetchone()
        if not locked or not locked["locked"]:
            return  # another sender has it
        with pool.connection(timeout=_CONNECT_S) as conn:
            _deliver(
                conn, settings, target, safe, stop, lambda outcome: counts.add(target.tenant_id, outcome)
            )


def _deliver(
    conn: Connection,
    settings: Settings,
    target: Target,
    safe: int,
    stop: threading.Event,
    count: Callable[[str], None],
) -> None:
    where = {"tenant": target.tenant_id, "url": target.url}
    cursor = conn.execute(
        "SELECT last_event_id FROM webhook_cursors WHERE tenant_id = %(tenant)s AND url = %(url)s"
        " AND (next_attempt_at IS NULL OR next_attempt_at <= now())",
        where,
    ).fetchone()
    if cursor is None:
        return  # removed, or waiting for its retry
    last = int(cursor["last_event_id"])
    events = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events"
        " WHERE tenant_id = %(tenant)s AND id > %(last)s AND id <= %(safe)s"
        " AND (%(types)s::text[] IS NULL OR type = ANY(%(types)s)) ORDER BY id LIMIT %(limit)s",
        {**where, "last": last, "safe": safe, "types": target.events, "limit": TURN_EVENTS},
    ).fetchall()
    if not events:  # only events this webhook does not want: pass them
        _move(conn, target, last, safe)
        return
    try:
        signer = target_signer(target, settings.secrets_dir)
    except ConfigurationError as e:
        outcome = _failed(conn, settings, target, last, events[0], str(e))
        if outcome is not None:
            count(outcome)
        return
    deadline = time.monotonic() + TURN_S
    with open_client(settings) as client:
        for event in events:
            if stop.is_set() or time.monotonic() > deadline:
                return
            error = post_event(client, target.url, signer, str(event["event_id"]), event_document(event))
            if error is None:
                count("delivered")
                if not _move(conn, target, last, int(event["id"]), delivered=True):
                    return
            else:
                outcome = _failed(conn, settings, target, last, event, error)
                if outcome is not None:
                    count(outcome)
                if outcome != "failed":
                    return
            last = int(event["id"])
    if len(events) < TURN_EVENTS:
        _move(conn, target, last, safe)  # past what follows and this webhook does not want


def _move(conn: Connection, target: Target, last: int, to: int, *, delivered: bool = False) -> bool:
    """Move the cursor from ``last`` to ``to``; False when another sender moved it meanwhile."""
    if to <= last:
        return True
    moved = conn.execute(
        "UPDATE webhook_cursors SET last_event_id = %s, attempts = 0, failing_since = NULL,"
        " next_attempt_at = NULL, last_error = NULL"
        + (", last_delivered_at = now()" if delivered else "")
        + " WHERE tenant_id = %s AND url = %s AND last_event_id = %s",
        (to, target.tenant_id, target.url, last),
    )
    return moved.rowcount == 1


def _failed(
    conn: Connection, settings: Settings, target: Target, last: int, event: dict[str, Any], error: str
) -> str | None:
    """Record a refused try of the head event; returns ``retrying`` or, once the retry window
    has passed, ``failed`` (the event is kept for a resend and the cursor passes it); ``None``
    when another sender moved the cursor meanwhile."""
    error = storable(printable(error))[:500]
    logger.warning(
        "webhook %s of tenant %s refused event %s: %s",
        shown_url(target.url),
        target.tenant_id,
        event["id"],
        error,
    )
    with conn.transaction():
        row = conn.execute(
            "SELECT attempts + 1 AS attempts, COALESCE(failing_since, now()) AS since,"
            " now() - COALESCE(failing_since, now()) >= make_interval(secs => %s) AS over"
            " FROM webhook_cursors WHERE tenant_id = %s AND url = %s AND last_event_id = %s FOR UPDATE",
            (settings.webhook_retry_hours * 3600, target.tenant_id, target.url, last),
        ).fetchone()
        if row is None:
            return None
        if not row["over"]:
            conn.execute(
                "UPDATE webhook_cursors SET attempts = %s, failing_since = %s, last_error = %s,"
                " next_attempt_at = now() + make_interval(secs => %s) WHERE tenant_id = %s AND url = %s",
                (
                    row["attempts"],
                    row["since"],
                    error,
                    backoff_ms(settings, row["attempts"]) / 1000,
                    target.tenant_id,
                    target.url,
                ),
            )
            return "retrying"
        conn.execute(
            "INSERT INTO webhook_deliveries (tenant_id, url, event_id, event_uuid, event_type, job_id, payload,"
            " attempts, last_error, first_attempt_at, last_attempt_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())"
            " ON CONFLICT (tenant_id, url, event_id) DO UPDATE SET status = 'failed',"
            " attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error, last_attempt_at = now()",
            (
                target.tenant_id,
                target.url,
                event["id"],
                event["event_id"],
                event["type"],
                event["job_id"],
                event_document(event).decode(),
                row["attempts"],
                error,
                row["since"],
            ),
        )
        conn.execute(
            "UPDATE webhook_cursors SET last_event_id = %s, attempts = 0, failing_since = NULL,"
            " next_attempt_at = NULL, last_error = NULL WHERE tenant_id = %s AND url = %s",
            (event["id"], target.tenant_id, target.url),
        )
    logger.error(
        "webhook %s of tenant %s: gave event %s up after %d tries; 'postbote events webhooks --failed' lists it",
        shown_url(target.url),
        target.tenant_id,
        event["id"],
        row["attempts"],
    )
    return "failed"


__all__ = [
    "OUTCOMES",
    "SENDER_THREADS",
    "Horizon",
    "WebhookCounts",
    "backoff_ms",
    "deliver_webhooks_forever",
    "track_webhooks",
]
