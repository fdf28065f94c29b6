"""The limiter's threads and lease blocks over the in-memory backend."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.ratelimit import oversized
from worker.errors import DatabaseUnavailable
from worker.job.ratelimit import Lease, MemoryBackend, PostgresBackend, SeriesLimiter, Throttled, Wait
from worker.job.ratelimit.pool import TenantPool


def send_from_threads(limiter: SeriesLimiter, tenant_id: str, *, threads: int, mails: int,
                      batch_size: int, pause_ms: int) -> list[float]:  # fmt: skip
    arrivals: list[float] = []
    lock = threading.Lock()

    def loop() -> None:
        for _ in range(mails):
            with limiter.slot(tenant_id, batch_size=batch_size, pause_ms=pause_ms):
                time.sleep(0.002)
                with lock:
                    arrivals.append(time.time())

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return arrivals


def test_threads_of_one_process_keep_the_series_limit() -> None:
    limiter = SeriesLimiter(MemoryBackend(), holder_id="test", block_size=4)
    arrivals = send_from_threads(limiter, "acme", threads=6, mails=5, batch_size=4, pause_ms=40)
    assert len(arrivals) == 30
    assert oversized(arrivals, batch_size=4, pause_ms=40) == []


def test_a_caller_that_would_wait_too_long_is_throttled_with_a_retry_time() -> None:
    limiter = SeriesLimiter(MemoryBackend(), holder_id="test")
    with limiter.slot("acme", batch_size=1, pause_ms=5_000):
        pass
    with (
        pytest.raises(Throttled) as caught,
        limiter.slot("acme", batch_size=1, pause_ms=5_000, max_wait_ms=100),
    ):
        pytest.fail("no slot expected")
    assert 4_000 < caught.value.retry_in_ms <= 5_000


def test_a_priority_caller_that_would_wait_too_long_is_throttled_and_frees_its_room() -> None:
    backend = MemoryBackend()
    limiter = SeriesLimiter(backend, holder_id="test")
    with limiter.slot("acme", batch_size=2, pause_ms=5_000):
        with limiter.slot("acme", batch_size=2, pause_ms=5_000):
            pass
        with pytest.raises(Throttled), limiter.slot("acme", batch_size=2, pause_ms=5_000, priority=True,
                                                    max_wait_ms=100):  # fmt: skip
            pytest.fail("no slot expected")
    assert backend._tenants["acme"].waiters == {}


def test_a_tenant_without_pause_is_not_limited_at_all() -> None:
    backend = MemoryBackend()
    limiter = SeriesLimiter(backend, holder_id="test")
    for _ in range(10):
        with limiter.slot("fast", batch_size=1, pause_ms=0) as slot:
            assert slot.waited_ms == 0
    assert backend._tenants == {}


def test_tenants_are_limited_independently() -> None:
    limiter = SeriesLimiter(MemoryBackend(), holder_id="test")
    with limiter.slot("slow", batch_size=1, pause_ms=60_000):
        pass
    with limiter.slot("quick", batch_size=1, pause_ms=60_000) as slot:
        assert slot.series_no == 1


def test_slots_of_a_block_nobody_uses_are_handed_back() -> None:
    pool = TenantPool("acme", block_size=8)
    lease = Lease(lease_id=1, tenant_id="acme", series_no=1, slots=3)

    def request(want: int) -> Lease | Wait:
        return lease

    local = pool.take(request, lease_ms=60_000, deadline=time.monotonic() + 1)
    assert pool.collect() == []
    (spent,) = pool.done(local, replied_us=time.monotonic_ns() // 1000)
    assert (spent.lease, spent.unused) == (lease, 2)


def test_close_hands_back_what_the_process_still_holds() -> None:
    backend = MemoryBackend()
    limiter = SeriesLimiter(backend, holder_id="test")
    with limiter.slot("acme", batch_size=5, pause_ms=1_000):
        assert backend._tenants["acme"].leases
    limiter.close()
    assert backend._tenants["acme"].leases == {}


def test_an_unreachable_database_is_reported_as_database_unavailable() -> None:
    backend = PostgresBackend("postgresql://postgres@127.0.0.1:1/none", connect_timeout_ms=1000)
    limiter = SeriesLimiter(backend, holder_id="test")
    with pytest.raises(DatabaseUnavailable) as caught, limiter.slot("acme", batch_size=1, pause_ms=100):
        pytest.fail("no slot expected")
    assert caught.value.__cause__ is not None


class FinishRecorder(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.finished: list[int | None] = []

    def release(self, lease: Lease, *, unused: int = 0, finished_us: int | None = None) -> bool:
        self.finished.append(finished_us)
        return super().release(lease, unused=unused, finished_us=finished_us)


def test_a_send_that_ended_normally_is_dated_by_its_holder_one_that_failed_by_the_backend() -> None:
    backend = FinishRecorder()
    limiter = SeriesLimiter(backend, holder_id="test", block_size=1)
    with limiter.slot("acme", batch_size=5, pause_ms=100):
        pass
    replied = backend._clock_us()
    with pytest.raises(OSError), limiter.slot("acme", batch_size=5, pause_ms=100):
        raise OSError("connection lost after the final dot")
    sent, failed = backend.finished
    assert sent is not None and sent <= replied + 1_000
    assert failed is None
