"""The series limiter the worker calls around each SMTP send."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from worker.errors import DatabaseUnavailable, Throttled

from .backend import Lease, SeriesBackend, Wait
from .pool import LocalLease, TenantPool
from .series import check_limits

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Slot:
    """Permission to send one mail now.

    Attributes:
      tenant_id: the tenant whose limit it counts against.
      series_no: the series it belongs to (0 when the tenant is unthrottled).
      waited_ms: how long the caller waited for it (for metrics).
      priority: whether it came through the priority lane.
    """

    tenant_id: str
    series_no: int
    waited_ms: int
    priority: bool


def default_holder_id() -> str:
    """``host:pid``, how operators find the process holding a lease."""
    return f"{socket.gethostname()}:{os.getpid()}"


class SeriesLimiter:
    """At most ``batch_size`` mails per series and tenant, then ``pause_ms`` of silence.

    One limiter per worker process, shared by its threads. Slots are leased
    from the backend in blocks (at most ``block_size`` per request, never more
    than the threads of this process waiting for the tenant at that moment),
    so a busy process makes two backend calls per block (acquire, release),
    not per mail.

    Parameters:
      backend: the shared store (:class:`~worker.job.ratelimit.postgres.PostgresBackend`).
      holder_id: names this process on its leases; defaults to ``host:pid``.
      lease_ms: a lease not released within this time counts as finished at
        its expiry, so a killed worker cannot block its tenant. A send must
        end within ``lease_ms / 2`` of its slot being granted.
      block_size: most slots one request leases for this process.
      ask_ahead_ms: ask this long before the time the backend named (the
        next series cannot open sooner) ...
      hold_ms: ... and let the backend hold a refused call up to this long,
        waiting on its own clock for the series to open. A held call keeps one
        database connection but no lock. Needs ``ask_ahead_ms <= hold_ms``.
    """

    def __init__(
        self,
        backend: SeriesBackend,
        *,
        holder_id: str | None = None,
        lease_ms: int = 60_000,
        block_size: int = 8,
        ask_ahead_ms: int = 20,
        hold_ms: int = 60,
    ) -> None:
        if lease_ms < 1 or block_size < 1:
            raise ValueError("lease_ms and block_size must be positive")
        if not 0 <= ask_ahead_ms <= hold_ms:
            raise ValueError("ask_ahead_ms must be between 0 and hold_ms")
        self.backend = backend
        self.holder_id = holder_id or default_holder_id()
        self.lease_ms = lease_ms
        self.block_size = block_size
        self.ask_ahead_ms = ask_ahead_ms
        self.hold_ms = hold_ms
        self._pools: dict[str, TenantPool] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(
        self,
        tenant_id: str,
        *,
        batch_size: int,
        pause_ms: int,
        priority: bool = False,
        max_wait_ms: int = 10_000,
    ) -> Iterator[Slot]:
        """Wait for a slot, send inside the ``with`` block, finish on exit.

        Sleeps (never polls the backend faster than it asks) until a slot is
        granted. The slot is finished on exit whether or not the send
        succeeded: a failed send may still have reached the server. Leave the
        block as soon as the server's final reply is in: a normal exit dates
        the finish (the series' pause starts then); an exception leaves the
        date to the backend's clock at the release.

        Parameters:
          batch_size: mails per series (at least 1).
          pause_ms: pause between the last mail of a series and the first of
            the next; 0 means unthrottled (no backend call at all).
          priority: interactive mail (receipts): served in the next series
            even while bulk senders compete.
          max_wait_ms: raise :class:`Throttled` instead of waiting longer.

        Raises:
          Throttled: no slot within ``max_wait_ms``; defer the job by ``retry_in_ms``.
          DatabaseUnavailable: the backend is unreachable (transient).
        """
        check_limits(batch_size, pause_ms)
        started = time.monotonic()
        if pause_ms == 0:
            yield Slot(tenant_id, 0, 0, priority)
            return
        deadline = started + max_wait_ms / 1000
        if priority:
            lease = self._take_priority(tenant_id, batch_size, pause_ms, deadline)
            local = LocalLease(lease, usable_until=0.0, taken=1, in_use=1)
            pool = None
        else:
            pool = self._pool(tenant_id)

            def request(want: int) -> Lease | Wait:
                return self.backend.acquire(
                    tenant_id,
                    holder_id=self.holder_id,
                    want=want,
                    batch_size=batch_size,
                    pause_ms=pause_ms,
                    lease_ms=self.lease_ms,
                    hold_ms=self.hold_ms,
                )

            local = pool.take(request, lease_ms=self.lease_ms, deadline=deadline)
            self._release(pool.collect())
        waited_ms = int((time.monotonic() - started) * 1000)
        # A send that raised may have reached the server at a time nobody saw:
        # only a block left normally, after the server's reply, dates its finish.
        replied_us: int | None = None
        try:
            yield Slot(tenant_id, local.lease.series_no, waited_ms, priority)
            replied_us = time.monotonic_ns() // 1000
        finally:
            if pool is None:
                local.note_reply(replied_us)
                self._release([local])
            else:
                self._release(pool.done(local, replied_us=replied_us))

    def expected_wait_ms(self, tenant_id: str) -> int:
        """How long this process expects ``tenant_id``'s next bulk slot to be away, without asking
        the backend: what the backend last answered here (0 when nothing is known)."""
        with self._lock:
            pool = self._pools.get(tenant_id)
        return pool.expected_wait_ms() if pool is not None else 0

    def close(self) -> None:
        """Hand back every leased slot not in use; the backend stays open."""
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            self._release(pool.collect(everything=True))

    def _pool(self, tenant_id: str) -> TenantPool:
        with self._lock:
            pool = self._pools.get(tenant_id)
            if pool is None:
                pool = self._pools[tenant_id] = TenantPool(
                    tenant_id, block_size=self.block_size, ask_ahead_ms=self.ask_ahead_ms
                )
            return pool

    def _take_priority(self, tenant_id: str, batch_size: int, pause_ms: int, deadline: float) -> Lease:
        # Priority callers skip the process-local queue and register as
        # waiters in the backend, so bulk grants everywhere keep room for them.
        waiter_id = f"{self.holder_id}:{uuid.uuid4().hex}"
        while True:
            outcome = self.backend.acquire(
                tenant_id,
                holder_id=self.holder_id,
                want=1,
                batch_size=batch_size,
                pause_ms=pause_ms,
                lease_ms=self.lease_ms,
                priority=True,
                waiter_id=waiter_id,
                hold_ms=self.hold_ms,
            )
            if isinstance(outcome, Lease):
                return outcome
            retry_at = time.monotonic() + outcome.retry_in_ms / 1000
            if retry_at > deadline:
                self.backend.forget_waiter(tenant_id, waiter_id)
                raise Throttled(tenant_id, outcome.retry_in_ms)
            time.sleep(max(retry_at - self.ask_ahead_ms / 1000 - time.monotonic(), 0.0))

    def _release(self, spent: list[LocalLease]) -> None:
        for local in spent:
            try:
                in_time = self.backend.release(
                    local.lease, unused=local.unused, finished_us=local.finished_us()
                )
            except DatabaseUnavailable:
                # The mail is out; failing the send now would resend it. The
                # lease expires and then counts as finished, which is later.
                log.warning("could not release series lease %s; it will expire", local.lease.lease_id)
                continue
            if not in_time:
                log.warning(
                    "series lease %s of tenant %s expired before its send finished; raise lease_ms",
                    local.lease.lease_id,
                    local.lease.tenant_id,
                )


__all__ = ["SeriesLimiter", "Slot", "default_holder_id"]
