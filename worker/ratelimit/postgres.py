"""The PostgreSQL backend: series state shared by every worker on every host.

Each call is one short transaction that locks the tenant's ``series_state``
row (``SELECT … FOR UPDATE``), reads the live leases and priority waiters,
applies :mod:`worker.ratelimit.series` and writes the result back. All times
come from the database clock, never the hosts'. Tables: see
``deploy/migrations/0002_series.sql``.

A transaction is two messages: "lock and read" and "write and commit", sent
as multi-statement queries (client-side parameter binding), so the row stays
locked for one client round trip however busy the worker host is.
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

# Limiter state is short-lived: waiting for the WAL flush would double the time
# the row stays locked. A database crash may lose the last milliseconds of
# grants (docs/series.md); nothing else changes.
_BEGIN = """
BEGIN;
SET LOCAL synchronous_commit TO off;
"""
_LOCK_STATE = """
INSERT INTO series_state (tenant_id) VALUES (%(tenant)s) ON CONFLICT DO NOTHING;
SELECT series_no, granted, opened_at, last_finish_at
  FROM series_state WHERE tenant_id = %(tenant)s FOR UPDATE;
"""
# Runs after the row lock was granted; clock_timestamp(), because every
# statement of one message shares its statement_timestamp(). Data-modifying
# CTEs see the snapshot from before their deletes, hence the explicit expiry
# filters in the counts.
_REAP = """
WITH now AS MATERIALIZED (SELECT clock_timestamp() AS t),
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
  FROM now;
"""
_SAVE_STATE = """
UPDATE series_state
   SET series_no = %(series_no)s, granted = %(granted)s,
       opened_at = %(opened_at)s, last_finish_at = %(last_finish_at)s
 WHERE tenant_id = %(tenant)s;
"""
_INSERT_LEASE = """
INSERT INTO series_leases (tenant_id, series_no, holder_id, slots, granted_at, expires_at)
VALUES (%(tenant)s, %(series_no)s, %(holder)s, %(slots)s, %(now)s,
        %(now)s + %(lease_ms)s * interval '1 millisecond')
RETURNING lease_id;
"""
_DELETE_WAITER = (
    "DELETE FROM series_priority_waiters WHERE tenant_id = %(tenant)s AND waiter_id = %(waiter)s;"
)
_UPSERT_WAITER = """
INSERT INTO series_priority_waiters (tenant_id, waiter_id, expires_at)
VALUES (%(tenant)s, %(waiter)s, %(expires_at)s)
ON CONFLICT (tenant_id, waiter_id) DO UPDATE SET expires_at = EXCLUDED.expires_at;
"""
# The finish time is read after the row lock was granted, which is after the
# SMTP server accepted the mail.
_DELETE_LEASE = """
WITH gone AS (DELETE FROM series_leases WHERE lease_id = %(lease_id)s RETURNING series_no)
SELECT clock_timestamp(), (SELECT series_no FROM gone);
"""
_COMMIT = "COMMIT;"

Row = tuple[object, ...]


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
        self._idle: list[psycopg.Connection[Row]] = []
        self._lock = threading.Lock()

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
        with self._session() as cur:
            state_row, reap_row = _query(cur, _BEGIN + _LOCK_STATE + _REAP, args)
            now_at, reaped_until, live, waiters = reap_row
            assert isinstance(now_at, datetime)
            now = _to_us(now_at)
            state = _state(state_row)
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
            write = {**args, **_state_args(outcome.state)}
            if isinstance(outcome, Granted):
                sql = _SAVE_STATE + (_DELETE_WAITER if waiter_id is not None else "") + _INSERT_LEASE
                write.update(holder=holder_id, slots=outcome.slots, now=now_at, lease_ms=lease_ms)
                ((lease_id,),) = _query(cur, sql + _COMMIT, write)
                full_ms = pause_ms if outcome.room_left == 0 else 0
                return Lease(_int(lease_id), tenant_id, outcome.state.series_no, outcome.slots, full_ms)
            sql = _SAVE_STATE + (_UPSERT_WAITER if priority else "")
            write["expires_at"] = _from_us(outcome.retry_at_us + WAITER_GRACE_MS * US_PER_MS)
            _query(cur, sql + _COMMIT, write)
            return Wait(ceil_ms(outcome.retry_at_us - now), outcome.state.series_no)

    def release(self, lease: Lease, *, unused: int = 0) -> bool:
        args: dict[str, object] = {"tenant": lease.tenant_id, "lease_id": lease.lease_id}
        with self._session() as cur:
            state_row, (now_at, series_no) = _query(cur, _BEGIN + _LOCK_STATE + _DELETE_LEASE, args)
            assert isinstance(now_at, datetime)
            state = finish(
                _state(state_row),
                now_us=_to_us(now_at),
                lease_series_no=None if series_no is None else _int(series_no),
                slots=lease.slots,
                unused=unused,
            )
            _query(cur, _SAVE_STATE + _COMMIT, {**args, **_state_args(state)})
            return series_no is not None

    def forget_waiter(self, tenant_id: str, waiter_id: str) -> None:
        with self._session() as cur:
            _query(cur, _DELETE_WAITER, {"tenant": tenant_id, "waiter": waiter_id})

    def close(self) -> None:
        """Close the idle connections; later calls open new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

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


def _query(cur: psycopg.ClientCursor[Row], sql: str, args: dict[str, object]) -> list[Row]:
    """Run several statements in one message; return the first row of each that returned rows."""
    cur.execute(sql, args)
    rows: list[Row] = []
    while True:
        if cur.description is not None:
            row = cur.fetchone()
            assert row is not None
            rows.append(row)
        if not cur.nextset():
            return rows


def _state(row: Row) -> SeriesState:
    series_no, granted, opened_at, last_finish_at = row
    return SeriesState(
        series_no=_int(series_no),
        granted=_int(granted),
        opened_us=_to_us(opened_at) if isinstance(opened_at, datetime) else None,
        last_finish_us=_to_us(last_finish_at) if isinstance(last_finish_at, datetime) else None,
    )


def _state_args(state: SeriesState) -> dict[str, object]:
    return {
        "series_no": state.series_no,
        "granted": state.granted,
        "opened_at": None if state.opened_us is None else _from_us(state.opened_us),
        "last_finish_at": None if state.last_finish_us is None else _from_us(state.last_finish_us),
    }


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _to_us(at: datetime) -> int:
    return (at - _EPOCH) // _US


def _from_us(us: int) -> datetime:
    return _EPOCH + us * _US


__all__ = ["PostgresBackend"]
