"""The PostgreSQL backend: series state shared by every worker on every host.

Each call is one short transaction that locks the tenant's ``series_state``
row (``SELECT … FOR UPDATE``), reads the live leases and priority waiters,
applies :mod:`worker.ratelimit.series` and writes the result back. All times
come from the database clock, never the hosts'. Tables: see
``deploy/migrations/0002_series.sql``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg

from worker.errors import DatabaseUnavailable

from .backend import Lease, SeriesBackend, Wait
from .series import US_PER_MS, WAITER_GRACE_MS, Granted, SeriesState, ceil_ms, decide, finish, reap

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

_LOCK_STATE = """
SELECT series_no, granted, opened_at, last_finish_at
  FROM series_state WHERE tenant_id = %(tenant)s FOR UPDATE
"""
_CREATE_STATE = "INSERT INTO series_state (tenant_id) VALUES (%(tenant)s) ON CONFLICT DO NOTHING"
# Runs with the row locked, so statement_timestamp() is after every finish
# recorded before us. Data-modifying CTEs see the snapshot from before their
# deletes, hence the explicit expiry filters in the counts.
_REAP = """
WITH now AS (SELECT statement_timestamp() AS t),
reaped AS (
    DELETE FROM series_leases l USING now
     WHERE l.tenant_id = %(tenant)s AND l.expires_at <= now.t
 RETURNING l.expires_at),
dropped AS (
    DELETE FROM series_priority_waiters w USING now
     WHERE w.tenant_id = %(tenant)s AND w.expires_at <= now.t)
SELECT now.t,
       (SELECT max(expires_at) FROM reaped),
       (SELECT count(*) FROM series_leases l
         WHERE l.tenant_id = %(tenant)s AND l.expires_at > now.t),
       (SELECT count(*) FROM series_priority_waiters w
         WHERE w.tenant_id = %(tenant)s AND w.expires_at > now.t
           AND w.waiter_id IS DISTINCT FROM %(waiter)s)
  FROM now
"""
_SAVE_STATE = """
UPDATE series_state
   SET series_no = %(series_no)s, granted = %(granted)s,
       opened_at = %(opened_at)s, last_finish_at = %(last_finish_at)s
 WHERE tenant_id = %(tenant)s
"""
_INSERT_LEASE = """
INSERT INTO series_leases (tenant_id, series_no, holder_id, slots, granted_at, expires_at)
VALUES (%(tenant)s, %(series_no)s, %(holder)s, %(slots)s, %(now)s,
        %(now)s + %(lease_ms)s * interval '1 millisecond')
RETURNING lease_id
"""
_DELETE_WAITER = "DELETE FROM series_priority_waiters WHERE tenant_id = %(tenant)s AND waiter_id = %(waiter)s"
_UPSERT_WAITER = """
INSERT INTO series_priority_waiters (tenant_id, waiter_id, expires_at)
VALUES (%(tenant)s, %(waiter)s, %(expires_at)s)
ON CONFLICT (tenant_id, waiter_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""
# clock_timestamp(), not now(): the finish must be read after the SMTP server
# accepted the mail, and after this transaction got the row lock.
_DELETE_LEASE = """
WITH gone AS (DELETE FROM series_leases WHERE lease_id = %(lease_id)s RETURNING series_no)
SELECT clock_timestamp(), (SELECT series_no FROM gone)
"""


class PostgresBackend(SeriesBackend):
    """Series state in PostgreSQL (tables from ``0002_series.sql``).

    Parameters:
      conninfo: a libpq URL or key/value string.
      max_idle_connections: connections kept open between calls; one call
        uses one connection, so a process needs about one per concurrently
        acquiring tenant.
      connect_timeout_ms: give up connecting after this long.

    Every psycopg error becomes :class:`worker.errors.DatabaseUnavailable`.
    """

    def __init__(
        self, conninfo: str, *, max_idle_connections: int = 4, connect_timeout_ms: int = 5000
    ) -> None:
        self._conninfo = conninfo
        self._max_idle = max_idle_connections
        self._connect_timeout_s = max(1, -(-connect_timeout_ms // 1000))
        self._idle: list[psycopg.Connection[tuple[object, ...]]] = []
        self._lock = threading.Lock()
        self._closed = False

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
    ) -> Lease | Wait:
        if priority and waiter_id is None:
            raise ValueError("a priority caller needs a waiter_id")
        args: dict[str, object] = {"tenant": tenant_id, "waiter": waiter_id}
        with self._transaction() as cur:
            state = _lock_state(cur, args)
            cur.execute(_REAP, args)
            now_at, reaped_until, live, waiters = _one(cur)
            assert isinstance(now_at, datetime)
            now = _to_us(now_at)
            if isinstance(reaped_until, datetime):
                state = reap(state, [_to_us(reaped_until)])
            outcome = decide(
                state,
                now_us=now,
                live_leases=_int(live),
                priority_waiters=_int(waiters),
                want=want,
                batch_size=batch_size,
                pause_ms=pause_ms,
                priority=priority,
            )
            _save_state(cur, tenant_id, outcome.state)
            if isinstance(outcome, Granted):
                if waiter_id is not None:
                    cur.execute(_DELETE_WAITER, args)
                cur.execute(
                    _INSERT_LEASE,
                    {
                        "tenant": tenant_id,
                        "series_no": outcome.state.series_no,
                        "holder": holder_id,
                        "slots": outcome.slots,
                        "now": now_at,
                        "lease_ms": lease_ms,
                    },
                )
                (lease_id,) = _one(cur)
                return Lease(_int(lease_id), tenant_id, outcome.state.series_no, outcome.slots)
            if priority:
                expires = outcome.retry_at_us + WAITER_GRACE_MS * US_PER_MS
                cur.execute(_UPSERT_WAITER, {**args, "expires_at": _from_us(expires)})
            return Wait(ceil_ms(outcome.retry_at_us - now), outcome.state.series_no)

    def release(self, lease: Lease, *, unused: int = 0) -> bool:
        args: dict[str, object] = {"tenant": lease.tenant_id, "lease_id": lease.lease_id}
        with self._transaction() as cur:
            state = _lock_state(cur, args)
            cur.execute(_DELETE_LEASE, args)
            now_at, series_no = _one(cur)
            assert isinstance(now_at, datetime)
            state = finish(
                state,
                now_us=_to_us(now_at),
                lease_series_no=None if series_no is None else _int(series_no),
                slots=lease.slots,
                unused=unused,
            )
            _save_state(cur, lease.tenant_id, state)
            return series_no is not None

    def forget_waiter(self, tenant_id: str, waiter_id: str) -> None:
        with self._transaction() as cur:
            cur.execute(_DELETE_WAITER, {"tenant": tenant_id, "waiter": waiter_id})

    def close(self) -> None:
        """Close the idle connections; later calls open new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[tuple[object, ...]]]:
        try:
            with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except psycopg.Error as e:
            raise DatabaseUnavailable(f"series limiter: {type(e).__name__}: {e}") from e

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=self._connect_timeout_s)
        try:
            yield conn
        except BaseException:
            # The connection may be broken or mid-transaction: don't reuse it.
            conn.close()
            raise
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()


def _lock_state(cur: psycopg.Cursor[tuple[object, ...]], args: dict[str, object]) -> SeriesState:
    cur.execute(_LOCK_STATE, args)
    row = cur.fetchone()
    if row is None:
        cur.execute(_CREATE_STATE, args)
        cur.execute(_LOCK_STATE, args)
        row = cur.fetchone()
    assert row is not None
    series_no, granted, opened_at, last_finish_at = row
    return SeriesState(
        series_no=_int(series_no),
        granted=_int(granted),
        opened_us=_to_us(opened_at) if isinstance(opened_at, datetime) else None,
        last_finish_us=_to_us(last_finish_at) if isinstance(last_finish_at, datetime) else None,
    )


def _save_state(cur: psycopg.Cursor[tuple[object, ...]], tenant_id: str, state: SeriesState) -> None:
    cur.execute(
        _SAVE_STATE,
        {
            "tenant": tenant_id,
            "series_no": state.series_no,
            "granted": state.granted,
            "opened_at": None if state.opened_us is None else _from_us(state.opened_us),
            "last_finish_at": None if state.last_finish_us is None else _from_us(state.last_finish_us),
        },
    )


def _one(cur: psycopg.Cursor[tuple[object, ...]]) -> tuple[object, ...]:
    row = cur.fetchone()
    assert row is not None
    return row


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _to_us(at: datetime) -> int:
    return (at - _EPOCH) // _US


def _from_us(us: int) -> datetime:
    return _EPOCH + us * _US


__all__ = ["PostgresBackend"]
