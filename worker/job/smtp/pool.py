"""Reusable SMTP connections, a small pool per tenant in each worker process."""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from schemas.tenant import Smtp
from worker.errors import (
    PostboteError,
    SmtpAuthFailed,
    SmtpConnectionError,
    SmtpRejected,
    SmtpTemporaryFailure,
    TlsVerifyFailed,
)
from worker.job.breaker import LoginBreaker
from worker.job.compose import Composed
from worker.job.smtp.connect import _Connection, _quit, open_connection
from worker.job.smtp.oauth import TokenHelpers
from worker.job.smtp.replies import Delivery
from worker.job.smtp.transaction import _envelope, _Progress, _transact
from worker.library_internals import set_smtp_timeout, smtp_socket_closed

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

    def set_limit(self, limit: int) -> None:
        """A new ``max_connections``; connections in use count against it until given back."""
        with self._cond:
            self._limit = limit
            self._cond.notify_all()

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


@dataclass
class _Tenant:
    """One tenant's connections in this process, following its current SMTP settings.

    ``settings`` is a token for those settings: a connection is tagged with the token it was
    opened under, and pooled again only while the token is current. A change of settings
    (any field: host, login, ``max_connections``, …) makes a new token and closes the idle
    connections; those in use are closed when they come back.
    """

    smtp: Smtp
    """The settings object seen last: AccountCache hands out the same one until it reloads."""
    settings: object
    permits: _Permits
    idle: list[_Connection] = field(default_factory=list)


class SmtpPool:
    """Reusable SMTP connections, a small pool per tenant in this worker process.

    At most ``max_connections`` connections per tenant are open at once (callers
    wait for a free one); a connection is closed after ``max_messages_per_connection``
    messages, after a 421, after an error, and when idle too long.

    With a ``breaker`` (the worker's), a new connection is tried only while the tenant's login
    is not failing (:mod:`worker.job.breaker`); a refused login or a certificate that does not
    verify opens the breaker and raises ``MustWait`` instead of the error.
    """

    def __init__(
        self,
        *,
        timeout_ms: int,
        on_connect: Callable[[str], None] | None = None,
        token_helpers: TokenHelpers | None = None,
        breaker: LoginBreaker | None = None,
    ) -> None:
        self._timeout_s = timeout_ms / 1000
        self._on_connect = on_connect
        self._token_helpers = token_helpers
        self._breaker = breaker
        self._lock = threading.Lock()
        self._tenants: dict[str, _Tenant] = {}

    def deliver(self, tenant_id: str, smtp: Smtp, message: Composed) -> Delivery:
        """Send one message to its envelope recipients: what the server said to each (see
        :class:`Delivery`). No connection, or a failed login, raises a classified ``PostboteError``."""
        permits, settings = self._current(tenant_id, smtp)
        if not permits.take(self._timeout_s * 2):
            raise SmtpConnectionError(f"no free SMTP connection for tenant {tenant_id!r}")
        conn = None
        try:
            conn = self._take_idle(tenant_id, settings) or self._open(tenant_id, smtp, settings)
            delivery = _transact(conn, message)
        except BaseException:
            if conn is not None:
                _quit(conn.client)
            permits.give()
            raise
        self._release(tenant_id, smtp, conn, permits, delivery)
        return delivery

    def _release(
        self, tenant_id: str, smtp: Smtp, conn: _Connection, permits: _Permits, delivery: Delivery
    ) -> None:
        """A connection after an attempt: pooled again, unless the attempt ended in an error or
        the connection was dropped to abort a transaction."""
        if delivery.error is None and not smtp_socket_closed(conn.client):
            self._put_back(tenant_id, smtp, conn, permits)
        else:
            _quit(conn.client)
            permits.give()

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
        promptly. An envelope the server refused in part or entirely is staged
        too: ``staged.deliver()`` then reports the refusals without asking the
        server again. A transaction not delivered when the block ends is reset
        and its connection reused.
        """
        permits, settings = self._current(tenant_id, smtp)
        if priority:
            free = permits.limit >= 2 and permits.take(0.0)
        else:
            free = permits.limit >= 2 and permits.take(self._timeout_s * 2, leave_free=1)
        if not free:
            yield None
            return
        staged = None
        try:
            staged = self._stage(tenant_id, smtp, settings, message, permits)
        finally:
            if staged is None:
                permits.give()
        try:
            yield staged
        finally:
            if staged is not None:
                staged.abandon()

    def close(self) -> None:
        idle: list[_Connection] = []
        with self._lock:
            for tenant in self._tenants.values():
                idle += tenant.idle
                tenant.idle = []
        for conn in idle:
            _quit(conn.client)

    def _stage(
        self, tenant_id: str, smtp: Smtp, settings: object, message: Composed, permits: _Permits
    ) -> Staged | None:
        conn = self._take_idle(tenant_id, settings)
        if conn is None:
            try:
                conn = self._open(tenant_id, smtp, settings)
            except PostboteError:
                return None  # deliver() tries again and reports the failure
        progress = _Progress(list(message.recipients))
        try:
            set_smtp_timeout(conn.client, min(self._timeout_s, _STAGE_TIMEOUT_S))
            _envelope(conn.client, message, progress)
            set_smtp_timeout(conn.client, self._timeout_s)
        except (OSError, smtplib.SMTPException, SmtpTemporaryFailure, SmtpRejected):
            # deliver() tries again on another connection and classifies what it gets.
            _quit(conn.client)
            return None
        except BaseException:
            _quit(conn.client)
            raise
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
            if self._pool_if_current(tenant_id, conn):
                return
        _quit(conn.client)

    def _put_back(self, tenant_id: str, smtp: Smtp, conn: _Connection, permits: _Permits) -> None:
        conn.sent += 1
        conn.last_used = time.monotonic()
        if conn.sent >= smtp.max_messages_per_connection or not self._pool_if_current(tenant_id, conn):
            _quit(conn.client)
        permits.give()

    def _pool_if_current(self, tenant_id: str, conn: _Connection) -> bool:
        """Make ``conn`` idle if it was opened with the tenant's current settings."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            if tenant is None or conn.settings is not tenant.settings:
                return False
            tenant.idle.append(conn)
            return True

    def _current(self, tenant_id: str, smtp: Smtp) -> tuple[_Permits, object]:
        """The tenant's permits and the token of its settings ``smtp``, which become its current
        settings if they differ: a new token, the new ``max_connections``, the idle connections closed."""
        retired: list[_Connection] = []
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            if tenant is None:
                tenant = self._tenants[tenant_id] = _Tenant(smtp, object(), _Permits(smtp.max_connections))
            elif tenant.smtp is not smtp:
                # By value only when the object changed, i.e. about once per settings cache reload.
                if tenant.smtp != smtp:
                    tenant.settings = object()
                    tenant.permits.set_limit(smtp.max_connections)
                    retired, tenant.idle = tenant.idle, []
                tenant.smtp = smtp
            current = tenant.permits, tenant.settings
        _retire(retired)
        return current

    def _take_idle(self, tenant_id: str, settings: object) -> _Connection | None:
        now = time.monotonic()
        while True:
            with self._lock:
                tenant = self._tenants.get(tenant_id)
                # The idle list holds only connections opened with the tenant's current settings.
                if tenant is None or tenant.settings is not settings or not tenant.idle:
                    return None
                conn = tenant.idle.pop()
            if now - conn.last_used < _IDLE_CLOSE_S:
                return conn
            _quit(conn.client)

    def _open(self, tenant_id: str, smtp: Smtp, settings: object) -> _Connection:
        """A new connection, logged in; asks the breaker first, and tells it how the login went."""
        if self._breaker is not None:
            self._breaker.admit(tenant_id)
        try:
            conn = open_connection(smtp, timeout_s=self._timeout_s, token_helpers=self._token_helpers)
        except (SmtpAuthFailed, TlsVerifyFailed) as e:
            if self._breaker is None:
                raise
            raise self._breaker.failed(tenant_id, e) from e
        if self._breaker is not None:
            self._breaker.succeeded(tenant_id)
        conn.settings = settings
        if self._on_connect is not None:
            self._on_connect(tenant_id)
        return conn


def _retire(conns: list[_Connection]) -> None:
    """Say QUIT on idle connections whose settings changed, in the background: a server that
    stopped answering (often why the settings changed) would hold up the send that noticed."""
    if conns:
        threading.Thread(target=_quit_all, args=(conns,), name="smtp-retire", daemon=True).start()


def _quit_all(conns: list[_Connection]) -> None:
    for conn in conns:
        set_smtp_timeout(conn.client, _STAGE_TIMEOUT_S)
        _quit(conn.client)


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
        """DATA, and any transactions a 452 left, like :meth:`SmtpPool.deliver`."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("a staged transaction is delivered once")
        try:
            delivery = _transact(conn, self._message, self._progress)
        except BaseException:
            _quit(conn.client)
            self._permits.give()
            raise
        self._pool._release(self._tenant_id, self._smtp, conn, self._permits, delivery)
        return delivery

    def abandon(self) -> None:
        """Reset the transaction unless it was delivered; the connection goes back to the pool."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._reset(self._tenant_id, conn)
            self._permits.give()
