"""The PostgreSQL backend: series state shared by every worker on every host.

Acquiring and releasing are one statement each: ``CALL series_acquire(…)``
and ``SELECT series_release(…)``, defined in
``deploy/migrations/0004_series_functions.sql`` on the tables of ``0002_series.sql``. They
lock the tenant's ``series_state`` row, reap expired leases, apply the series
rule (a transcription of :mod:`worker.job.ratelimit.series`, proven equal to it by
``tests/test_ratelimit_equivalence.py``) and write the result back, so the row
is locked only while the server works, never across a client round trip
however busy the worker host is. All times are on the database clock, never
the hosts'; a release may bring the holder's upper bound of that clock at the
SMTP server's last reply (:meth:`~worker.job.ratelimit.backend.Lease.backend_time_us`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg

from worker.db import AnswerLimited, answer_limit_s, connection_kwargs
from worker.errors import DatabaseUnavailable
from worker.settings import DEFAULT_STATEMENT_TIMEOUT_MS

from .backend import Lease, SeriesBackend, Wait
from .series import check_limits, clock_bound_us

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

_ACQUIRE = """
CALL series_acquire(%(tenant)s, %(holder)s, %(want)s, %(batch_size)s, %(pause_ms)s, %(lease_ms)s,
                    %(priority)s, %(waiter)s, %(hold_ms)s, %(at)s, NULL, NULL, NULL, NULL, NULL, NULL)
"""
_RELEASE = "SELECT series_release(%(tenant)s, %(lease_id)s, %(slots)s, %(unused)s, %(at)s, %(finished)s::timestamptz)"
_FORGET_WAITER = "DELETE FROM series_priority_waiters WHERE tenant_id = %(tenant)s AND waiter_id = %(waiter)s"
# Limiter state is short-lived: waiting for the WAL flush would make every call
# as slow as an fsync. A database crash may lose the last milliseconds of
# grants (docs/series.md); nothing else changes. Not so where the server waits for a
# synchronous standby: a failover to it must not lose a grant (a series would be over-full),
# so there the server's own setting stays (docs/high-availability.md).
_SESSION_SETUP = (
    "SELECT set_config('synchronous_commit', 'off', false)"
    " WHERE current_setting('synchronous_standby_names') = ''"
)

Row = tuple[object, ...]


class PostgresBackend(SeriesBackend):
    """Series state in PostgreSQL (tables from ``0002_series.sql``, functions from ``0004_series_functions.sql``).

    Parameters:
      conninfo: a libpq URL or key/value string.
      max_idle_connections: connections kept open between calls; one call
        uses one connection, so a process needs about one per concurrently
        acquiring tenant.
      connect_timeout_ms: give up connecting after this long.
      statement_timeout_ms: PostgreSQL's ``statement_timeout`` of its connections, which also
        wait no longer than that (and a grace) for an answer (``worker.db.AnswerLimited``);
        they have keepalives and ``tcp_user_timeout`` as every postbote connection
        (``worker.db.connection_kwargs``).
      clock_us: for tests only: the time in microseconds to use instead of
        the database clock (``hold_ms`` is then ignored).

    Every psycopg error becomes :class:`worker.errors.DatabaseUnavailable`.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        max_idle_connections: int = 4,
        connect_timeout_ms: int = 5000,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        clock_us: Callable[[], int] | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._max_idle = max_idle_connections
        self._connect_kwargs = {
            **connection_kwargs(conninfo, statement_timeout_ms=statement_timeout_ms),
            "connect_timeout": max(1, -(-connect_timeout_ms // 1000)),
        }
        self._answer_limit_s = answer_limit_s(statement_timeout_ms)
        self._clock_us = clock_us
        self._idle: list[psycopg.Connection[Row]] = []
        self._lock = threading.Lock()
        self._best_anchor: tuple[int, int] | None = None

    def acquire(
        self,
        tenant_id: str,
        *,
        holder_id: str,
        want: int,
        batch_size: int,
        pause_ms: int,
        lease_ms: int,
        priority: bool = False,
        waiter_id: str | None = None,
        hold_ms: int = 0,
    ) -> Lease | Wait:
        if priority and waiter_id is None:
            raise ValueError("a priority caller needs a waiter_id")
        check_limits(batch_size, pause_ms)
        if want < 1:
            raise ValueError(f"want must be at least 1, got {want}")
        args = {
            "tenant": tenant_id,
            "holder": holder_id,
            "want": want,
            "batch_size": batch_size,
            "pause_ms": pause_ms,
            "lease_ms": lease_ms,
            "priority": priority,
            "waiter": waiter_id,
            "hold_ms": hold_ms,
            "at": self._at(),
        }
        with self._session() as cur:
            asked_us = time.monotonic_ns() // 1000
            lease_id, series_no, slots, next_ask_ms, retry_in_ms, called_at = _one(cur, _ACQUIRE, args)
        anchor = self._anchor(asked_us, _us(called_at))
        if lease_id is None:
            return Wait(_int(retry_in_ms), _int(series_no))
        return Lease(
            _int(lease_id),
            tenant_id,
            _int(series_no),
            _int(slots),
            _int(next_ask_ms),
            asked_us=anchor[0],
            clock_us=anchor[1],
        )

    def _anchor(self, asked_us: int, clock_us: int) -> tuple[int, int]:
        """The pair (local time, database clock read after it) that bounds the database clock
        tightest from now on: this call's, or an earlier one that came back quicker."""
        with self._lock:
            best = self._best_anchor
            if best is None or clock_bound_us(*best, asked_us) >= clock_us:
                best = self._best_anchor = (asked_us, clock_us)
            return best

    def release(self, lease: Lease, *, unused: int = 0, finished_us: int | None = None) -> bool:
        if not 0 <= unused <= lease.slots:
            raise ValueError(f"unused must be between 0 and {lease.slots}, got {unused}")
        args = {
            "tenant": lease.tenant_id,
            "lease_id": lease.lease_id,
            "slots": lease.slots,
            "unused": unused,
            "at": self._at(),
            "finished": None if finished_us is None else _EPOCH + finished_us * _US,
        }
        with self._session() as cur:
            (in_time,) = _one(cur, _RELEASE, args)
        return in_time is True

    def forget_waiter(self, tenant_id: str, waiter_id: str) -> None:
        with self._session() as cur:
            cur.execute(_FORGET_WAITER, {"tenant": tenant_id, "waiter": waiter_id})

    def close(self) -> None:
        """Close the idle connections; later calls open new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _at(self) -> datetime | None:
        return None if self._clock_us is None else _EPOCH + self._clock_us() * _US

    @contextmanager
    def _session(self) -> Iterator[psycopg.ClientCursor[Row]]:
        try:
            with self._connection() as conn, psycopg.ClientCursor(conn) as cur:
                yield cur
        except psycopg.Error as e:
            raise DatabaseUnavailable(f"series limiter: {type(e).__name__}: {e}") from e

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Row]]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        fresh = conn is None or conn.closed
        if fresh:
            # autocommit: series_acquire commits before it sleeps, which a
            # procedure may only do outside a transaction block.
            conn = AnswerLimited.connect(self._conninfo, autocommit=True, **self._connect_kwargs)
            conn.answer_limit_s = self._answer_limit_s
            conn.on_unanswered = self.close
        assert conn is not None
        try:
            if fresh:
                conn.execute(_SESSION_SETUP)
            yield conn
        except BaseException:
            # The connection may be broken or mid-statement: don't reuse it.
            conn.close()
            raise
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()


def _one(cur: psycopg.ClientCursor[Row], sql: str, args: dict[str, object]) -> Row:
    cur.execute(sql, args)
    row = cur.fetchone()
    assert row is not None
    return row


def _us(at: object) -> int:
    assert isinstance(at, datetime)
    return (at - _EPOCH) // _US


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


__all__ = ["PostgresBackend"]
