"""The interface a series limiter needs from its shared store."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from .series import clock_bound_us


@dataclass(frozen=True, slots=True)
class Lease:
    """Slots granted to one holder in one series, to be released exactly once.

    Attributes:
      lease_id: the backend's id for :meth:`SeriesBackend.release`.
      tenant_id: the tenant (SMTP account) the slots count against.
      series_no: the series the slots belong to.
      slots: how many mails may be sent under this lease.
      next_ask_in_ms: when positive, this grant filled the series for bulk
        callers: asking again sooner would be refused.
      asked_us: this host's ``time.monotonic_ns() // 1000`` just before a
        request was sent (this one's or an earlier one's) ...
      clock_us: ... and the backend's clock read after that request arrived;
        both ``None`` when the backend does not say.
    """

    lease_id: int
    tenant_id: str
    series_no: int
    slots: int
    next_ask_in_ms: int = 0
    asked_us: int | None = None
    clock_us: int | None = None

    def backend_time_us(self, local_us: int) -> int | None:
        """An upper bound of the backend's clock at this host's monotonic time ``local_us``.

        ``clock_us - asked_us`` is at least the offset between the clocks
        (the backend read its clock after ``asked_us``); the time elapsed since
        is added with the most two clocks can drift apart. ``None`` when the
        backend gave no clock reading.
        """
        if self.asked_us is None or self.clock_us is None:
            return None
        return clock_bound_us(self.asked_us, self.clock_us, local_us)


@dataclass(frozen=True, slots=True)
class Wait:
    """No slot now; ask again in ``retry_in_ms`` (a lower bound, never an overshoot)."""

    retry_in_ms: int
    series_no: int


class SeriesBackend(abc.ABC):
    """Shared per-tenant series state: PostgreSQL in production, memory in tests.

    Every method is atomic per tenant and uses the backend's own clock, never
    the caller's. Implementations must be thread-safe.
    """

    @abc.abstractmethod
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
        """Lease up to ``want`` slots in the tenant's current series, or say when to ask again.

        Parameters:
          holder_id: who holds the lease (host and process), for operators.
          lease_ms: after this long an unreleased lease counts as finished.
          priority: may use the room kept for priority waiters; when refused,
            ``waiter_id`` is registered as a waiter so bulk grants keep room for it.
          waiter_id: required with ``priority``; the same id on every retry.
          hold_ms: while refused with the next chance at most this long after
            the call began, wait for it (blocking no other caller) and ask
            again, so a caller may ask a little early and still be served on
            time. ``Wait`` is returned only for a later retry time.
        """

    @abc.abstractmethod
    def release(self, lease: Lease, *, unused: int = 0, finished_us: int | None = None) -> bool:
        """Finish ``lease`` (called after the SMTP server accepted its last mail).

        ``unused`` slots were never used and go back to the series.
        ``finished_us`` is an upper bound of the backend's clock when the
        holder saw the server's last reply (:meth:`Lease.backend_time_us`); the
        lease finishes at the earlier of it and the backend's clock now.
        Returns ``False`` when the lease had already expired (a send outlived it).
        """

    @abc.abstractmethod
    def forget_waiter(self, tenant_id: str, waiter_id: str) -> None:
        """Drop a priority waiter that gave up, so bulk callers get its room back."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free resources (connections); the default has none."""


__all__ = ["Lease", "SeriesBackend", "Wait"]
