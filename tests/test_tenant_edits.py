"""SMTP settings edited with ``postbote tenants apply`` while workers run: pooled connections and
connection permits follow them within the settings cache time."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ledger import wait_final
from tests.support.services import RunningWorker, send_jobs
from tests.support.smtp import message, received_messages, server_of, sink_starter
from worker.db import Connection
from worker.errors import SmtpConnectionError
from worker.job.smtp import SmtpPool
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.slow import SlowHandler


def open_connections(sink: Sink) -> set[int]:
    """Local ports of the established TCP connections to ``sink``, seen from the client side."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{sink.port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class ConnectionWatch:
    """Samples the connections open to a sink every 20 ms in a thread of its own."""

    def __init__(self, sink: Sink) -> None:
        self.samples: list[set[int]] = []
        self._sink = sink
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(open_connections(self._sink))
            self._stop.wait(0.02)

    def stop(self) -> list[set[int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def smtp_of(sink: Sink, **fields: Any) -> dict[str, Any]:
    return {"host": sink.host, "port": sink.port, "security": "none", "helo": "test.postbote", **fields}


def invoices(tenant: str, numbers: range) -> list[dict[str, Any]]:
    return [make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com") for n in numbers]


def jobs_received(sink: Sink, count: int) -> set[str]:
    return {str(m["X-Postbote-Job"]) for _, m in received_messages(sink, count=count)}


def past_the_cache_time(settings: Settings) -> None:
    time.sleep(settings.settings_cache_ms / 1000 + 0.3)


@pytest.fixture
def own_worker(own_queues: Settings) -> Iterator[RunningWorker]:
    running = RunningWorker(own_queues, processes=1, threads=8)
    yield running
    running.stop()


def test_mail_sent_after_a_tenant_moves_to_another_server_arrives_there_only(
    own_queues: Settings,
    own_worker: RunningWorker,
    sink: Sink,
    make_tenant: Any,
    db: Connection,
    tmp_path: Path,
) -> None:
    tenant = make_tenant()
    moved_to = Sink(tmp_path / "maildir-moved")
    try:
        before = send_jobs(own_queues, invoices(tenant, range(6)))
        assert {r["status"] for r in wait_final(db, before).values()} == {"sent"}
        assert open_connections(sink), "the worker keeps its connections to the old server pooled"

        make_tenant(id=tenant, smtp=smtp_of(moved_to))
        past_the_cache_time(own_queues)
        after = send_jobs(own_queues, invoices(tenant, range(6, 12)))
        assert {r["status"] for r in wait_final(db, after).values()} == {"sent"}

        assert jobs_received(sink, 6) == set(before)
        assert jobs_received(moved_to, 6) == set(after)
        assert wait_for(lambda: not open_connections(sink), timeout=5), (
            "idle connections to the old server are closed"
        )
    finally:
        moved_to.stop()


def test_a_lowered_max_connections_holds_for_the_next_sends_and_the_old_connections_are_closed(
    own_queues: Settings, own_worker: RunningWorker, make_tenant: Any, db: Connection, tmp_path: Path
) -> None:
    slow = Sink(tmp_path / "maildir-slow", handler=SlowHandler(tmp_path / "maildir-slow", delay_s=1.0))
    try:
        tenant = make_tenant(smtp=smtp_of(slow, max_connections=8))
        first = send_jobs(own_queues, invoices(tenant, range(8)))
        assert wait_for(lambda: len(open_connections(slow)) == 8, timeout=30)
        old = open_connections(slow)

        make_tenant(id=tenant, smtp=smtp_of(slow, max_connections=2))
        assert {r["status"] for r in wait_final(db, first).values()} == {"sent"}
        past_the_cache_time(own_queues)

        watch = ConnectionWatch(slow)
        second = send_jobs(own_queues, invoices(tenant, range(8, 20)))
        rows = wait_final(db, second)
        samples = watch.stop()
    finally:
        slow.stop()
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert max(len(ports - old) for ports in samples) == 2
    assert not samples[-1] & old, "connections opened with max_connections 8 are closed"


@pytest.fixture
def start_sink(tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    with sink_starter(tmp_path) as start:
        yield start


@pytest.fixture
def pool() -> Iterator[SmtpPool]:
    running = SmtpPool(timeout_ms=300)
    yield running
    running.close()


def test_the_pool_closes_idle_connections_of_settings_that_changed(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    old, new = start_sink(), start_sink()
    pool.deliver("acme", server_of(old), message("a@example.com"))
    kept = open_connections(old)
    assert len(kept) == 1
    pool.deliver("acme", server_of(old), message("b@example.com", n=2))
    assert open_connections(old) == kept, "the same settings, reloaded, keep the connection"

    pool.deliver("acme", server_of(new), message("c@example.com", n=3))
    assert [r.rcpt_tos for r in new.handler.received] == [["c@example.com"]]
    assert wait_for(lambda: not open_connections(old), timeout=5)
    assert len(open_connections(new)) == 1


def test_the_pool_closes_a_connection_in_use_during_a_change_when_it_comes_back(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    old, new = start_sink(), start_sink()
    with pool.staged("acme", server_of(old), message("a@example.com")) as staged:
        assert staged is not None
        pool.deliver("acme", server_of(new), message("b@example.com", n=2))
        staged.deliver()
    assert [r.rcpt_tos for r in old.handler.received] == [["a@example.com"]]
    assert not open_connections(old)
    pool.deliver("acme", server_of(new), message("c@example.com", n=3))
    assert len(open_connections(new)) == 1


def test_a_lowered_max_connections_counts_the_connections_still_in_use(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink()
    wide, narrow = server_of(sink, max_connections=3), server_of(sink, max_connections=2)
    with (
        pool.staged("acme", wide, message("a@example.com")) as first,
        pool.staged("acme", wide, message("b@example.com", n=2)) as second,
    ):
        assert first is not None and second is not None
        with pytest.raises(SmtpConnectionError):
            pool.deliver("acme", narrow, message("c@example.com", n=3))
        first.deliver()
        second.deliver()
    assert not open_connections(sink)
    pool.deliver("acme", narrow, message("c@example.com", n=3))
    assert len(open_connections(sink)) == 1
