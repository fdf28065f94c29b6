"""The series limit across OS processes, coordinated through a real PostgreSQL.

Each sender process runs several threads; a "send" records its arrival time
in a file. The only timing assertion is the invariant: split the arrivals
wherever the gap is at least ``pause_ms``; no chunk may exceed ``batch_size``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from schemas.tenant import Smtp
from tests.support.ratelimit import (
    Sender,
    chunks,
    oversized,
    read_arrivals,
    record_arrival,
    run_holder,
    run_sender,
    series_database,
    throttled_count,
)
from worker.job.compose import Composed
from worker.job.ratelimit import Lease, PostgresBackend, SeriesLimiter, Throttled, Wait
from worker.job.smtp import SmtpPool
from worker.testbed.sink import Sink

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def dsn() -> Iterator[str]:
    """A fresh database with the series tables and functions, dropped afterwards."""
    with series_database() as url:
        yield url


def run_processes(*senders: Sender, timeout_s: float = 60) -> None:
    procs = [SPAWN.Process(target=run_sender, args=(s,)) for s in senders]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_two_processes_with_four_threads_each_keep_the_series_limit(dsn: str, tmp_path: Path) -> None:
    sender = Sender(dsn, str(tmp_path), "acme", threads=4, mails=6, batch_size=5, pause_ms=80)
    run_processes(sender, sender)
    arrivals = read_arrivals(tmp_path, "acme")
    assert len(arrivals) == 48
    assert oversized(arrivals, batch_size=5, pause_ms=80) == []


def test_a_busy_tenant_does_not_hold_up_another(dsn: str, tmp_path: Path) -> None:
    slow = Sender(
        dsn, str(tmp_path), "slow", threads=3, mails=3, batch_size=1, pause_ms=60_000, max_wait_ms=300
    )
    quick = Sender(dsn, str(tmp_path), "quick", threads=3, mails=8, batch_size=6, pause_ms=50)
    run_processes(slow, quick, slow, quick)
    assert len(read_arrivals(tmp_path, "slow")) == 1
    assert throttled_count(tmp_path, "slow") == 17
    quick_arrivals = read_arrivals(tmp_path, "quick")
    assert len(quick_arrivals) == 48
    assert throttled_count(tmp_path, "quick") == 0
    assert oversized(quick_arrivals, batch_size=6, pause_ms=50) == []


def test_a_killed_workers_lease_expires_and_the_tenant_continues(dsn: str, tmp_path: Path) -> None:
    holder = SPAWN.Process(target=run_holder, args=(dsn, str(tmp_path), "acme", 4, 100, 1500))
    holder.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "holding").exists():
        assert holder.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()

    sender = Sender(dsn, str(tmp_path), "acme", threads=3, mails=4, batch_size=4, pause_ms=100, lease_ms=1500)
    run_processes(sender, sender)
    arrivals = read_arrivals(tmp_path, "acme")
    assert len(arrivals) == 1 + 24
    assert oversized(arrivals, batch_size=4, pause_ms=100) == []


def test_a_caller_is_throttled_instead_of_waiting_past_max_wait(dsn: str) -> None:
    limiter = SeriesLimiter(PostgresBackend(dsn), holder_id="test")
    with limiter.slot("acme", batch_size=1, pause_ms=10_000):
        pass
    with (
        pytest.raises(Throttled) as caught,
        limiter.slot("acme", batch_size=1, pause_ms=10_000, max_wait_ms=200),
    ):
        pytest.fail("no slot expected")
    assert caught.value.retry_in_ms > 200
    limiter.backend.close()


def test_a_priority_caller_is_served_in_the_next_series_while_bulk_senders_compete(
    dsn: str, tmp_path: Path
) -> None:
    stop = tmp_path / "stop"
    bulk = Sender(dsn, str(tmp_path), "acme", threads=4, mails=1, batch_size=4, pause_ms=100,
                  until_file=str(stop))  # fmt: skip
    procs = [SPAWN.Process(target=run_sender, args=(bulk,)) for _ in range(2)]
    for p in procs:
        p.start()
    limiter = SeriesLimiter(PostgresBackend(dsn), holder_id="receipts")
    receipts: list[tuple[float, float]] = []
    try:
        while len(read_arrivals(tmp_path, "acme")) < 12:
            time.sleep(0.05)
        for _ in range(6):
            asked = time.time()
            with limiter.slot("acme", batch_size=4, pause_ms=100, priority=True):
                time.sleep(0.003)
                receipts.append((asked, record_arrival(tmp_path, "acme")))
            time.sleep(0.13)
    finally:
        stop.write_text("")
        for p in procs:
            p.join(60)
        limiter.backend.close()
    assert [p.exitcode for p in procs] == [0, 0]

    arrivals = read_arrivals(tmp_path, "acme")
    assert oversized(arrivals, batch_size=4, pause_ms=100) == []
    starts = [c[0] for c in chunks(arrivals, 100)]
    for asked, arrived in receipts:
        # Sent in the series running when the receipt was asked for, or the next one.
        assert sum(1 for s in starts if asked < s <= arrived) <= 1


def test_a_held_call_blocks_nobody_and_is_granted_a_pause_after_the_last_finish(dsn: str) -> None:
    backend = PostgresBackend(dsn)

    def acquire(hold_ms: int) -> Lease | Wait:
        return backend.acquire(
            "acme", holder_id="test", want=1, batch_size=1, pause_ms=300, lease_ms=60_000, hold_ms=hold_ms
        )

    first = acquire(0)
    assert isinstance(first, Lease)
    events: list[str] = []
    held: list[Lease | Wait] = []

    def ask_and_hold() -> None:
        held.append(acquire(2_000))
        events.append("granted")

    asker = threading.Thread(target=ask_and_hold)
    asker.start()
    time.sleep(0.05)
    backend.release(first)  # locks the tenant's row: must not wait for the held call
    events.append("released")
    with psycopg.connect(dsn) as conn:
        (last_finish,) = conn.execute("SELECT last_finish_at FROM series_state").fetchone() or (None,)
    asker.join()
    backend.close()

    assert events == ["released", "granted"]
    (second,) = held
    assert isinstance(second, Lease) and second.series_no == first.series_no + 1
    with psycopg.connect(dsn) as conn:
        (granted_at,) = conn.execute("SELECT granted_at FROM series_leases").fetchone() or (None,)
    assert isinstance(last_finish, datetime) and isinstance(granted_at, datetime)
    assert granted_at - last_finish >= timedelta(milliseconds=300)


def test_the_recorded_finish_is_never_before_the_servers_acceptance(dsn: str, tmp_path: Path) -> None:
    sink = Sink(tmp_path / "maildir")
    smtp = SmtpPool(timeout_ms=5000)
    server = Smtp(host=sink.host, port=sink.port, security="none")
    backend = PostgresBackend(dsn)
    limiter = SeriesLimiter(backend, holder_id="test")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for n in range(20):
                # batch_size 1 and a short pause: most grants come from calls the database held.
                with limiter.slot("acme", batch_size=1, pause_ms=15):
                    smtp.deliver("acme", server, plain_message(n))
                row = conn.execute(
                    "SELECT last_finish_at FROM series_state WHERE tenant_id = 'acme'"
                ).fetchone()
                assert row is not None and isinstance(row[0], datetime)
                assert row[0].timestamp() >= sink.handler.received[-1].arrived_at, n
        assert len(sink.handler.received) == 20
    finally:
        limiter.close()
        backend.close()
        smtp.close()
        sink.stop()


def plain_message(n: int) -> Composed:
    data = f"From: a@acme.example\r\nTo: b@example.com\r\nSubject: {n}\r\n\r\nHallo\r\n".encode()
    return Composed(data, "a@acme.example", ("b@example.com",), f"<{n}@acme.example>", smtputf8=False)
