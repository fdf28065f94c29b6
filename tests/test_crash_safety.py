"""Workers die mid-series: every job still ends sent exactly once (or, in the one documented window,
a counted duplicate with the same Message-ID), and a job that keeps killing workers is stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.faults import assert_sent_once_or_dead, worker_children
from tests.support.ledger import wait_dead, wait_final
from tests.support.services import RunningWorker, delete_queues, isolated_settings, send_jobs
from worker.db import Connection
from worker.job.compose import message_id_for
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import RecordingHandler, Sink
from worker.testbed.sink.faults import SilentAfterData


class SlowHandler(RecordingHandler):
    """Takes a while over each message, so a series is still running when the worker dies."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        await asyncio.sleep(0.1)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def crash_settings(settings: Settings) -> Iterator[Settings]:
    own = isolated_settings(settings, crash_loop_after=2, min_backoff_ms=100, max_backoff_ms=500)
    yield own
    delete_queues(own)


def kill_the_worker_process(supervisor: RunningWorker) -> int:
    """SIGKILL the (only) worker process; the supervisor starts a new one. Returns the dead pid."""
    deadline = time.monotonic() + 30
    while not (children := worker_children(supervisor.process.pid)):
        assert time.monotonic() < deadline, "no worker process to kill"
        time.sleep(0.1)
    os.kill(children[0], signal.SIGKILL)
    return children[0]


def tenant_on(make_tenant: Any, sink: Sink) -> str:
    tenant: str = make_tenant(smtp={"host": sink.host, "port": sink.port, "security": "none"})
    return tenant


def test_a_worker_killed_mid_series_and_restarted_sends_every_job_once(
    crash_settings: Settings, make_tenant: Any, db: Connection, tmp_path: Path
) -> None:
    sink = Sink(tmp_path / "maildir", handler=SlowHandler(tmp_path / "maildir"))
    worker = RunningWorker(crash_settings, processes=1, threads=4)
    try:
        tenant = tenant_on(make_tenant, sink)
        ids = send_jobs(
            crash_settings,
            [make_job(tenant, "invoice", n, user_id="u1", to=f"k{n}@example.com") for n in range(40)],
        )
        deadline = time.monotonic() + 30
        while len(sink.handler.received) < 8:
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.02)
        kill_the_worker_process(worker)
        rows = assert_sent_once_or_dead(db, ids, sink.handler, timeout=120, possible_duplicates=True)
        assert {r["status"] for r in rows.values()} == {"sent"}
        assert "exited with -9" in worker.output()
        assert "released" in worker.output() or all(r["takeovers"] == 0 for r in rows.values())
    finally:
        worker.stop()
        sink.stop()


def test_a_job_that_keeps_killing_its_worker_is_stopped_as_a_crash_loop(
    crash_settings: Settings, make_tenant: Any, db: Connection, tmp_path: Path
) -> None:
    handler = SilentAfterData(tmp_path / "maildir", times=1000, silence_s=60)
    sink = Sink(tmp_path / "maildir", handler=handler)
    worker = RunningWorker(crash_settings, processes=1, threads=2)
    try:
        job = make_job(tenant_on(make_tenant, sink), "invoice", 1, user_id="u1", to="kunde@example.com")
        [job_id] = send_jobs(crash_settings, [job])
        message_id = message_id_for(job["job_id"], "anna@acme.example")
        for deliveries in range(1, crash_settings.crash_loop_after + 1):
            deadline = time.monotonic() + 60
            while handler.data_seen[message_id] < deliveries:
                assert time.monotonic() < deadline, worker.output()
                time.sleep(0.05)
            kill_the_worker_process(worker)
        row = wait_final(db, [job_id], timeout=60)[job_id]
        assert (row["status"], row["reason"]) == ("failed", "crash_loop")
        assert "2 deliveries" in row["detail"]
        assert wait_dead(db, job_id)["reason"] == "crash_loop"
        assert handler.data_seen[message_id] == crash_settings.crash_loop_after
    finally:
        worker.stop()
        sink.stop()
