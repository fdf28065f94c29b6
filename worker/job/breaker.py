"""The login circuit breaker: after a refused login, a tenant's jobs wait instead of each trying.

Providers lock an account (or block the address) after a few failed logins, and with a wrong
password every queued job would try once, on every worker. So a refused login or a server
certificate that does not verify opens the tenant's breaker, a row in ``login_breakers`` that
every worker process on every host reads before it opens an SMTP connection for the tenant:

* open: the connection is not tried; the job waits (``MustWait``: held, ``login_failing``)
  until ``retry_at``, without using an attempt;
* from ``retry_at`` on, one connection at a time is let through as a probe (a lease of
  ``probe_ms``): refused again, the breaker stays open for another ``hold_ms``; a login that
  works deletes the row, and the waiting jobs go out when they come back;
* ``postbote tenants apply`` with changed SMTP settings deletes the row: new settings are tried at once.

Only new connections ask, so a tenant whose pooled connections work costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

from worker.db import Connection, translated_errors
from worker.errors import MustWait, PostboteError
from worker.vocabulary import Reason, Status

PROBE_WAIT_MS = (500, 5000)
"""How long a job waits while another job's probe is under way: at least, at most."""


@dataclass(frozen=True)
class FailingLogin:
    """An open breaker, as ``postbote_login_failing`` and ``postbote check`` show it."""

    tenant: str
    reason: str
    detail: str
    failures: int
    failing_since: datetime
    retry_at: datetime


class LoginBreaker:
    """The breakers of all tenants, shared through PostgreSQL by every worker process.

    Parameters:
      connection: a context manager factory of autocommit connections (a pool's ``connection``).
      hold_ms: how long jobs wait after a failure before the next probe.
      probe_ms: how long one probe may take before another job may probe (an SMTP connect and login).
    """

    def __init__(
        self, connection: Callable[[], AbstractContextManager[Connection]], *, hold_ms: int, probe_ms: int
    ) -> None:
        self._connection = connection
        self._hold_ms = hold_ms
        self._probe_ms = probe_ms

    def admit(self, tenant_id: str) -> None:
        """Return when a connection for ``tenant_id`` may be tried (no failure, or this is the probe).

        Raises:
          MustWait: the breaker is open, or another job probes right now.
          DatabaseUnavailable: the breaker cannot be read.
        """
        with self._connection() as conn, translated_errors():
            row = conn.execute(
                "SELECT detail, greatest(retry_at, COALESCE(probe_until, retry_at)) AS due,"
                " (retry_at - now()) > interval '0' AS holding, now() AS now"
                " FROM login_breakers WHERE tenant_id = %s",
                (tenant_id,),
            ).fetchone()
            if row is None:
                return
            if not row["holding"]:
                claimed = conn.execute(
                    "UPDATE login_breakers SET probe_until = now() + %s * interval '1 millisecond'"
                    " WHERE tenant_id = %s AND retry_at <= now() AND (probe_until IS NULL OR probe_until <= now())"
                    " RETURNING tenant_id",
                    (self._probe_ms, tenant_id),
                ).fetchone()
                if claimed is not None:
                    return
        wait_ms = _ms(row["due"] - row["now"])
        if not row["holding"]:
            wait_ms = min(max(wait_ms, PROBE_WAIT_MS[0]), PROBE_WAIT_MS[1])
        raise MustWait(
            f"tenant {tenant_id!r}: the SMTP login is failing ({row['detail']}); the job waits,"
            f" one job tries again in {wait_ms / 1000:.0f} s",
            reason=Reason.LOGIN_FAILING,
            status=Status.HELD,
            wait_ms=wait_ms,
        )

    def failed(self, tenant_id: str, error: PostboteError) -> MustWait:
        """Open (or keep open) the tenant's breaker after ``error``; returns what the job that
        failed raises instead, so it waits like the others.

        Raises:
          DatabaseUnavailable: the breaker cannot be written.
        """
        detail = str(error)[:500]
        with self._connection() as conn, translated_errors():
            conn.execute(
                "INSERT INTO login_breakers (tenant_id, reason, detail, failures, failing_since, retry_at)"
                " VALUES (%(t)s, %(r)s, %(d)s, 1, now(), now() + %(h)s * interval '1 millisecond')"
                " ON CONFLICT (tenant_id) DO UPDATE SET reason = EXCLUDED.reason, detail = EXCLUDED.detail,"
                " failures = login_breakers.failures + 1, retry_at = EXCLUDED.retry_at, probe_until = NULL",
                {"t": tenant_id, "r": str(error.reason), "d": detail, "h": self._hold_ms},
            )
        return MustWait(
            f"tenant {tenant_id!r}: {detail}; the tenant's jobs wait {self._hold_ms / 1000:.0f} s,"
            " then one tries again (fix the login and run 'postbote tenants apply')",
            reason=Reason.LOGIN_FAILING,
            status=Status.HELD,
            wait_ms=self._hold_ms,
        )

    def succeeded(self, tenant_id: str) -> None:
        """A login of the tenant worked: close its breaker."""
        with self._connection() as conn, translated_errors():
            conn.execute("DELETE FROM login_breakers WHERE tenant_id = %s", (tenant_id,))


def failing_logins(conn: Connection) -> list[FailingLogin]:
    """Every tenant whose last login failed."""
    with translated_errors():
        rows = conn.execute(
            "SELECT tenant_id, reason, detail, failures, failing_since, retry_at FROM login_breakers ORDER BY tenant_id"
        ).fetchall()
    return [
        FailingLogin(
            str(r["tenant_id"]),
            str(r["reason"]),
            str(r["detail"]),
            int(r["failures"]),
            r["failing_since"],
            r["retry_at"],
        )
        for r in rows
    ]


def reset_breaker(conn: Connection, tenant_id: str) -> bool:
    """Close a tenant's breaker (its settings changed); whether one was open."""
    return conn.execute("DELETE FROM login_breakers WHERE tenant_id = %s", (tenant_id,)).rowcount > 0


def _ms(delta: object) -> int:
    seconds = delta.total_seconds() if hasattr(delta, "total_seconds") else 0.0
    return max(0, round(seconds * 1000))


__all__ = ["FailingLogin", "LoginBreaker", "failing_logins", "reset_breaker"]
