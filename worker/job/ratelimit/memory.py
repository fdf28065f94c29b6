"""A process-local backend: the series rule without a database, for tests."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .backend import Lease, SeriesBackend, Wait
from .series import US_PER_MS, WAITER_GRACE_MS, Granted, Refused, SeriesState, ceil_ms, decide, finish, reap


def _wall_clock_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class _Tenant:
    state: SeriesState
    leases: dict[int, tuple[int, int, int]]  # lease_id -> (series_no, slots, expires_us)
    waiters: dict[str, int]  # waiter_id -> expires_us


class MemoryBackend(SeriesBackend):
    """Series state in a dict, guarded by one lock; only coordinates threads of one process.

    Parameters:
      clock_us: the clock in microseconds (defaults to the wall clock), so tests
        can drive time by hand. A held call (``hold_ms``) sleeps outside the
        lock until this clock reaches the retry time, so give hand-driven
        clocks ``hold_ms=0``.
    """

    def __init__(self, clock_us: Callable[[], int] = _wall_clock_us) -> None:
        self._clock_us = clock_us
        self._lock = threading.Lock()
        self._tenants: dict[str, _Tenant] = {}
        self._ids = itertools.count(1)

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
        asked_us = time.monotonic_ns() // 1000
        called_us = self._clock_us()
        hold_until = called_us + max(hold_ms, 0) * US_PER_MS
        while True:
            outcome, now = self._try_acquire(
                tenant_id, holder_id, want, batch_size, pause_ms, lease_ms, priority, waiter_id
            )
            if isinstance(outcome, Lease):
                return replace(outcome, asked_us=asked_us, clock_us=called_us)
            if outcome.retry_at_us > hold_until or outcome.retry_at_us <= now:
                return Wait(ceil_ms(outcome.retry_at_us - now), outcome.state.series_no)
            # Outside the lock, like series_acquire's sleep after its commit.
            time.sleep(max(outcome.retry_at_us - self._clock_us(), 0) / 1e6)

    def _try_acquire(
        self,
        tenant_id: str,
        holder_id: str,
        want: int,
        batch_size: int,
        pause_ms: int,
        lease_ms: int,
        priority: bool,
        waiter_id: str | None,
    ) -> tuple[Lease | Refused, int]:
        with self._lock:
            now = self._clock_us()
            tenant = self._tenants.setdefault(tenant_id, _Tenant(SeriesState(), {}, {}))
            expired = [lid for lid, (_, _, exp) in tenant.leases.items() if exp <= now]
            tenant.state = reap(tenant.state, (tenant.leases.pop(lid)[2] for lid in expired))
            for wid in [w for w, exp in tenant.waiters.items() if exp <= now]:
                del tenant.waiters[wid]
            others = sum(1 for w in tenant.waiters if w != waiter_id)
            outcome = decide(
                tenant.state,
                now_us=now,
                live_leases=len(tenant.leases),
                priority_waiters=others,
                want=want,
                batch_size=batch_size,
                pause_ms=pause_ms,
                priority=priority,
            )
            tenant.state = outcome.state
            if isinstance(outcome, Granted):
                if waiter_id is not None:
                    tenant.waiters.pop(waiter_id, None)
                lease_id = next(self._ids)
                tenant.leases[lease_id] = (
                    outcome.state.series_no,
                    outcome.slots,
                    now + lease_ms * US_PER_MS,
                )
                full_ms = pause_ms if outcome.room_left == 0 else 0
                return Lease(lease_id, tenant_id, outcome.state.series_no, outcome.slots, full_ms), now
            if priority and waiter_id is not None:
                tenant.waiters[waiter_id] = outcome.retry_at_us + WAITER_GRACE_MS * US_PER_MS
            return outcome, now

    def release(self, lease: Lease, *, unused: int = 0, finished_us: int | None = None) -> bool:
        with self._lock:
            tenant = self._tenants[lease.tenant_id]
            held = tenant.leases.pop(lease.lease_id, None)
            tenant.state = finish(
                tenant.state,
                now_us=self._clock_us(),
                lease_series_no=None if held is None else held[0],
                slots=lease.slots,
                unused=unused,
                finished_us=finished_us,
            )
            return held is not None

    def forget_waiter(self, tenant_id: str, waiter_id: str) -> None:
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            if tenant is not None:
                tenant.waiters.pop(waiter_id, None)


__all__ = ["MemoryBackend"]
