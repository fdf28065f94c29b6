"""Reusable SMTP connections, a small pool per tenant in each worker process."""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from schemas.tenant import Smtp
from worker.compose import Composed
from worker.errors import (
    PostboteError,
    SmtpConnectionError,
    SmtpRejected,
    SmtpTemporaryFailure,
)
from worker.smtp.connect import _Connection, _quit, _set_timeout, open_connection
from worker.smtp.replies import Delivery
from worker.smtp.transaction import _envelope, _Progress, _transact

_IDLE_CLOSE_S = 30.0
# A server slower than this to accept an envelope ahead of the series slot is
# not worth holding a connection for: the send then goes the ordinary way.
_STAGE_TIMEOUT_S = 1.0


class _Permits:
    """How many connections of one tenant are in use in this process, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_use = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    def take(self, timeout_s: float, *, leave_free: int = 0) -> bool:
        """Take one, waiting up to ``timeout_s`` until ``leave_free`` more stay free besides."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._in_use + 1 + leave_free <= self._limit, timeout_s):
                return False
            self._in_use += 1
            return True

    def give(self) -> None:
        with self._cond:
            self._in_use -= 1
            # Waiters differ in how many must stay free: wake them all.
            self._cond.notify_all()


class SmtpPool:
    """Reusable SMTP connections, a small pool per tenant in this worker process.

    At most ``max_connections`` connections per tenant are open at once (callers
    wait for a free one); a connection is closed after ``max_messages_per_connection``
    messages, after a 421, after an error, and when idle too long.
    """

    def __init__(self, *, timeout_ms: int, on_connect: Callable[[str], None] | None = None) -> None:
        self._timeout_s = timeout_ms / 1000
        self._on_connect = on_connect
        self._lock = threading.Lock()
        self._idle: dict[str, list[_Connection]] = {}
        self._permits: dict[str, _Permits] = {}

    def deliver(self, tenant_id: str, smtp: Smtp, message: Composed) -> Delivery:
        """Send one message to its envelope recipients; raises a classified ``PostboteError``."""
        permits = self._tenant_permits(tenant_id, smtp)
        if not permits.take(self._timeout_s * 2):
            raise SmtpConnectionError(f"no free SMTP connection for tenant {tenant_id!r}")
        conn = None
        try:
            conn = self._take_idle(tenant_id) or self._open(tenant_id, smtp)
            delivery = _transact(conn, message)
        except BaseException:
            if conn is not None:
                _quit(conn.client)
            permits.give()
            raise
        self._put_back(tenant_id, smtp, conn, permits)
        return delivery

    @contextmanager
    def staged(
        self, tenant_id: str, smtp: Smtp, message: Composed, *, priority: bool = False
    ) -> Iterator[Staged | None]:
        """Say MAIL FROM and RCPT TO now, DATA later: ``staged.deliver()`` inside the series slot.

        Bulk callers wait for a connection that leaves one more free (receipts
        must not wait behind bulk sends waiting for their slot), as long as
        :meth:`deliver` would wait for any; a ``priority`` caller (a receipt)
        takes any connection free right now and waits for none. Yields ``None``
        (send with :meth:`deliver` then) when the tenant has a single
        connection, none was free, or the server did not accept the envelope
        promptly; an envelope it refused is left to :meth:`deliver`, which
        classifies the refusal as always. A transaction not delivered when the
        block ends is reset and its connection reused.
        """
        permits = self._tenant_permits(tenant_id, smtp)
        if priority:
            free = permits.limit >= 2 and permits.take(0.0)
        else:
            free = permits.limit >= 2 and permits.take(self._timeout_s * 2, leave_free=1)
        if not free:
            yield None
            return
        staged = None
        try:
            staged = self._stage(tenant_id, smtp, message, permits)
        finally:
            if staged is None:
                permits.give()
        try:
            yield staged
        finally:
            if staged is not None:
                staged.abandon()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                _quit(conn.client)

    def _stage(self, tenant_id: str, smtp: Smtp, message: Composed, permits: _Permits) -> Staged | None:
        conn = self._take_idle(tenant_id)
        if conn is None:
            try:
                conn = self._open(tenant_id, smtp)
            except PostboteError:
                return None  # deliver() tries again and reports the failure
        progress = _Progress(list(message.recipients))
        try:
            _set_timeout(conn.client, min(self._timeout_s, _STAGE_TIMEOUT_S))
            _envelope(conn.client, message, progress)
            _set_timeout(conn.client, self._timeout_s)
        except (OSError, smtplib.SMTPException, SmtpTemporaryFailure, SmtpRejected):
            # deliver() tries again on another connection and classifies what it gets.
            _quit(conn.client)
            return None
        except BaseException:
            _quit(conn.client)
            raise
        if not progress.batch:
            # Every recipient refused: deliver() repeats and reports it.
            self._reset(tenant_id, conn)
            return None
        return Staged(self, tenant_id, smtp, conn, message, progress, permits)

    def _reset(self, tenant_id: str, conn: _Connection) -> None:
        """Drop an unfinished transaction; keep the connection if the server agrees.
        The caller gives back its permit."""
        try:
            code, _ = conn.client.rset()
        except (OSError, smtplib.SMTPException):
            code = 0
        if code == 250:
            conn.last_used = time.monotonic()
            with self._lock:
                self._idle.setdefault(tenant_id, []).append(conn)
        else:
            _quit(conn.client)

    def _put_back(self, tenant_id: str, smtp: Smtp, conn: _Connection, permits: _Permits) -> None:
        conn.sent += 1
        conn.last_used = time.monotonic()
        if conn.sent >= smtp.max_messages_per_connection:
            _quit(conn.client)
        else:
            with self._lock:
                self._idle.setdefault(tenant_id, []).append(conn)
        permits.give()

    def _tenant_permits(self, tenant_id: str, smtp: Smtp) -> _Permits:
        with self._lock:
            return self._permits.setdefault(tenant_id, _Permits(smtp.max_connections))

    def _take_idle(self, tenant_id: str) -> _Connection | None:
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(tenant_id)
                if not idle:
                    return None
                conn = idle.pop()
            if now - conn.last_used < _IDLE_CLOSE_S:
                return conn
            _quit(conn.client)

    def _open(self, tenant_id: str, smtp: Smtp) -> _Connection:
        conn = open_connection(smtp, timeout_s=self._timeout_s)
        if self._on_connect is not None:
            self._on_connect(tenant_id)
        return conn


class Staged:
    """A transaction whose envelope the server accepted, on a connection held for it."""

    def __init__(
        self,
        pool: SmtpPool,
        tenant_id: str,
        smtp: Smtp,
        conn: _Connection,
        message: Composed,
        progress: _Progress,
        permits: _Permits,
    ) -> None:
        self._pool = pool
        self._tenant_id = tenant_id
        self._smtp = smtp
        self._conn: _Connection | None = conn
        self._message = message
        self._progress = progress
        self._permits = permits

    def deliver(self) -> Delivery:
        """DATA, and any transactions a 452 left; raises a classified ``PostboteError`` like
        :meth:`SmtpPool.deliver`."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("a staged transaction is delivered once")
        try:
            delivery = _transact(conn, self._message, self._progress)
        except BaseException:
            _quit(conn.client)
            self._permits.give()
            raise
        self._pool._put_back(self._tenant_id, self._smtp, conn, self._permits)
        return delivery

    def abandon(self) -> None:
        """Reset the transaction unless it was delivered; the connection goes back to the pool."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._reset(self._tenant_id, conn)
            self._permits.give()
