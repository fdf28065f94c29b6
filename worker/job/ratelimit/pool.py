"""Process-local sharing of leases among the threads sending for one tenant.

One thread at a time asks the backend, for as many slots as there are
threads waiting (at most ``block_size``); the others wait on a condition and
take slots from the lease it brings back. While the backend says "not before
T", nobody asks before ``T - ask_ahead_ms``: asked that early, the backend
holds the call (``hold_ms``) and grants on its own clock the moment the next
series opens, so neither this host's wake-up latency nor a round trip is
added to the pause. A lease is released once, when its last slot in use is
finished and no more slots of it will be used: all were taken, no thread is
waiting, or it is past half its lifetime (a send must end well before the
lease expires).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.errors import Throttled

from .backend import Lease, Wait


@dataclass(eq=False, slots=True)
class LocalLease:
    """A lease as seen by this process: how many slots are taken and in use.

    ``replied_us`` is the latest ``time.monotonic_ns() // 1000`` at which a
    send under it had its server's final reply (0: none yet). ``failed`` is
    set once a send failed: it may have reached the server at a time nobody
    saw, so the backend finishes the lease on its own clock.
    """

    lease: Lease
    usable_until: float  # time.monotonic()
    taken: int = 0
    in_use: int = 0
    replied_us: int = 0
    failed: bool = False

    def note_reply(self, replied_us: int | None) -> None:
        """A send under this lease ended: its final reply was seen at ``replied_us``, or it failed."""
        if replied_us is None:
            self.failed = True
        else:
            self.replied_us = max(self.replied_us, replied_us)

    def finished_us(self) -> int | None:
        """An upper bound of the backend's clock at the last reply, when one is known."""
        if self.failed or self.replied_us == 0:
            return None
        return self.lease.backend_time_us(self.replied_us)

    @property
    def unused(self) -> int:
        return self.lease.slots - self.taken


class TenantPool:
    """The leases and waiting threads of one tenant in this process."""

    def __init__(self, tenant_id: str, *, block_size: int, ask_ahead_ms: int = 0) -> None:
        self.tenant_id = tenant_id
        self._block_size = block_size
        self._ask_ahead = ask_ahead_ms / 1000
        self._cond = threading.Condition()
        self._leases: list[LocalLease] = []
        self._waiting = 0
        self._asking = False
        self._not_before = 0.0  # time.monotonic(); the backend refused until then

    def take(
        self,
        request: Callable[[int], Lease | Wait],
        *,
        lease_ms: int,
        deadline: float,
    ) -> LocalLease:
        """Take one slot, asking the backend through ``request(want)`` when none is free.

        Raises :class:`Throttled` when no slot can be had before ``deadline``
        (``time.monotonic()``).
        """
        with self._cond:
            self._waiting += 1
            try:
                return self._take(request, lease_ms=lease_ms, deadline=deadline)
            finally:
                self._waiting -= 1

    def _take(self, request: Callable[[int], Lease | Wait], *, lease_ms: int, deadline: float) -> LocalLease:
        while True:
            now = time.monotonic()
            for local in self._leases:
                if local.unused > 0 and now < local.usable_until:
                    local.taken += 1
                    local.in_use += 1
                    return local
            if self._not_before > deadline:
                raise Throttled(self.tenant_id, _ms(self._not_before - now))
            ask_from = self._not_before - self._ask_ahead
            if not self._asking and now >= ask_from:
                self._ask(request, lease_ms=lease_ms)
                continue
            if now >= deadline:
                raise Throttled(self.tenant_id, _ms(max(self._not_before - now, 0.0)))
            until = deadline if self._asking else min(ask_from, deadline)
            self._cond.wait(max(until - now, 0.0))

    def _ask(self, request: Callable[[int], Lease | Wait], *, lease_ms: int) -> None:
        self._asking = True
        want = min(self._block_size, self._waiting)
        asked = time.monotonic()
        self._cond.release()
        try:
            outcome = request(want)
        finally:
            self._cond.acquire()
            self._asking = False
            self._cond.notify_all()
        if isinstance(outcome, Wait):
            # Measured from the answer: the backend's "now" was no later, so
            # this never wakes before the time it named.
            self._not_before = time.monotonic() + outcome.retry_in_ms / 1000
        else:
            # Measured from the question: the lease started no earlier.
            self._leases.append(LocalLease(outcome, usable_until=asked + lease_ms / 2000))
            # A full series opens its successor no sooner than a pause after
            # its last finish, which is after now: don't poll before that.
            self._not_before = asked + outcome.next_ask_in_ms / 1000

    def expected_wait_ms(self) -> int:
        """How long until a slot, as far as this process knows: 0 while a leased slot is free or
        the backend named no time ahead."""
        with self._cond:
            now = time.monotonic()
            if any(local.unused > 0 and now < local.usable_until for local in self._leases):
                return 0
            return _ms(max(self._not_before - now, 0.0))

    def done(self, local: LocalLease, *, replied_us: int | None) -> list[LocalLease]:
        """A slot of ``local`` is finished, its reply seen at ``replied_us`` (``None``: the send
        failed); returns the leases to release now."""
        with self._cond:
            local.in_use -= 1
            local.note_reply(replied_us)
        return self.collect()

    def collect(self, *, everything: bool = False) -> list[LocalLease]:
        """Close and return the leases whose slots will not be used any more.

        A lease is spent when none of its slots is in use and either all were
        taken, no thread is waiting, or it is too old to hand out. With
        ``everything``, all leases not in use are returned (``close()``).
        """
        with self._cond:
            now = time.monotonic()
            spent = [
                local
                for local in self._leases
                if local.in_use == 0
                and (everything or local.unused == 0 or self._waiting == 0 or now >= local.usable_until)
            ]
            for local in spent:
                self._leases.remove(local)
            return spent


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000 + 0.999))


__all__ = ["LocalLease", "TenantPool"]
