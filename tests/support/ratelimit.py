"""The series limiter tests' tools: the invariant check, sender processes, a series database."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.support.services import ROOT, database_url
from worker.db import drop_database, ensure_database
from worker.errors import DatabaseUnavailable
from worker.job.ratelimit import PostgresBackend, SeriesLimiter, Throttled


def chunks(arrivals: list[float], pause_ms: int) -> list[list[float]]:
    """Split sorted arrival times (seconds) wherever the gap is at least ``pause_ms``."""
    result: list[list[float]] = []
    for t in sorted(arrivals):
        if result and (t - result[-1][-1]) * 1000 < pause_ms:
            result[-1].append(t)
        else:
            result.append([t])
    return result


def oversized(arrivals: list[float], *, batch_size: int, pause_ms: int) -> list[int]:
    """Sizes of the chunks that break the series limit (empty when it held)."""
    return [len(c) for c in chunks(arrivals, pause_ms) if len(c) > batch_size]


def read_arrivals(directory: Path, tenant_id: str) -> list[float]:
    """All arrivals of ``tenant_id`` recorded by :func:`record_arrival` under ``directory``."""
    times: list[float] = []
    for path in directory.glob("arrivals-*.txt"):
        for line in path.read_text().splitlines():
            tenant, _, t = line.partition(" ")
            if tenant == tenant_id:
                times.append(float(t))
    return times


def record_arrival(directory: Path, tenant_id: str) -> float:
    """Append "tenant time" to this process's arrival file (durable enough for SIGKILL); returns the time."""
    stamp = f"{time.time():.6f}"
    line = f"{tenant_id} {stamp}\n".encode()
    fd = os.open(directory / f"arrivals-{os.getpid()}.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return float(stamp)


@dataclass(frozen=True)
class Sender:
    """What one sender process does: ``mails`` slots per thread for ``tenant_id``."""

    dsn: str
    out: str
    tenant_id: str
    threads: int
    mails: int
    batch_size: int
    pause_ms: int
    lease_ms: int = 60_000
    max_wait_ms: int = 30_000
    send_ms: int = 3
    until_file: str | None = None  # with it: keep sending until the file exists


def run_sender(sender: Sender) -> None:
    """Process entry point: threads that take slots, "send" (sleep), record the arrival."""
    out = Path(sender.out)
    limiter = SeriesLimiter(PostgresBackend(sender.dsn), lease_ms=sender.lease_ms)
    throttled = 0
    lock = threading.Lock()

    def loop() -> None:
        nonlocal throttled
        sent = 0
        while sent < sender.mails or (sender.until_file and not Path(sender.until_file).exists()):
            try:
                with limiter.slot(
                    sender.tenant_id,
                    batch_size=sender.batch_size,
                    pause_ms=sender.pause_ms,
                    max_wait_ms=sender.max_wait_ms,
                ):
                    time.sleep(sender.send_ms / 1000)
                    record_arrival(out, sender.tenant_id)
                sent += 1
            except Throttled:
                with lock:
                    throttled += 1
                sent += 1

    threads = [threading.Thread(target=loop) for _ in range(sender.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    limiter.close()
    limiter.backend.close()
    (out / f"throttled-{sender.tenant_id}-{os.getpid()}.txt").write_text(str(throttled))


def run_holder(dsn: str, out: str, tenant_id: str, batch_size: int, pause_ms: int, lease_ms: int) -> None:
    """Process entry point: take one slot, record the send, then hang until killed."""
    limiter = SeriesLimiter(PostgresBackend(dsn), lease_ms=lease_ms)
    with limiter.slot(tenant_id, batch_size=batch_size, pause_ms=pause_ms):
        record_arrival(Path(out), tenant_id)
        Path(out, "holding").write_text("")
        time.sleep(3600)


def throttled_count(directory: Path, tenant_id: str) -> int:
    """Throttled slots reported by the sender processes of ``tenant_id``."""
    return sum(int(p.read_text()) for p in directory.glob(f"throttled-{tenant_id}-*.txt"))


MIGRATIONS_DIR = ROOT / "deploy" / "migrations"
SERIES_MIGRATIONS = ("0002_series.sql", "0004_series_functions.sql")


@contextmanager
def series_database() -> Iterator[str]:
    """A fresh database with the series tables and functions (applied twice: harmless), dropped afterwards."""
    url = database_url(f"postbote_test_{uuid.uuid4().hex[:12]}")
    try:
        ensure_database(url)
    except DatabaseUnavailable as e:
        pytest.fail(f"{e}; `make test` starts PostgreSQL")
    try:
        with psycopg.connect(url) as conn:
            for _ in range(2):
                for migration in SERIES_MIGRATIONS:
                    conn.execute((MIGRATIONS_DIR / migration).read_text().encode())
        yield url
    finally:
        drop_database(url)


__all__ = [
    "MIGRATIONS_DIR",
    "SERIES_MIGRATIONS",
    "Sender",
    "chunks",
    "oversized",
    "read_arrivals",
    "record_arrival",
    "run_holder",
    "run_sender",
    "series_database",
    "throttled_count",
]
