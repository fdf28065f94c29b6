"""SIGTERM: the worker finishes what it is sending, hands the rest back, and exits within the grace period."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.constants import JOB_HEADER
from tests.support.ledger import wait_final
from tests.support.observe import wait_metrics
from tests.support.services import RunningWorker, send_jobs
from tests.support.smtp import received_messages
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.slow import SlowHandler

GRACE_S = 15


@pytest.fixture
def slow_sink(tmp_path: Path) -> Iterator[Sink]:
    running = Sink(tmp_path / "slow", handler=SlowHandler(tmp_path / "slow", delay_s=2.0))
    yield running
    running.stop()


def test_sigterm_finishes_in_flight_sends_and_loses_or_doubles_nothing(
    own_queues: Settings, slow_sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant(
        smtp={"host": slow_sink.host, "port": slow_sink.port, "security": "none", "helo": "test.postbote"}
    )
    first = RunningWorker(own_queues, threads=2, shutdown_grace_ms=GRACE_S * 1000)
    jobs = [make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com") for n in range(10)]
    try:
        wait_metrics(first.metrics_port)
        ids = send_jobs(own_queues, jobs)
        assert isinstance(slow_sink.handler, SlowHandler)
        assert slow_sink.handler.data_started.wait(30), "no send got under way"
        asked = time.monotonic()
        code = first.stop(signal.SIGTERM, timeout=GRACE_S + 30)
        took = time.monotonic() - asked
    finally:
        first.stop(signal.SIGKILL)

    assert code == 0, first.output()
    assert took < GRACE_S
    assert "did not stop in time" not in first.output()
    unfinished = db.execute(
        "SELECT count(*) AS n FROM deliveries WHERE job_id = ANY(%s::uuid[]) AND status = 'sending'", (ids,)
    ).fetchone()
    assert unfinished is not None and unfinished["n"] == 0, "a send was cut off mid-way"
    sent_by_first = len(slow_sink.handler.received)
    assert 1 <= sent_by_first < len(jobs)

    second = RunningWorker(own_queues, threads=4)
    try:
        rows = wait_final(db, ids, timeout=90)
    finally:
        second.stop()
    assert {r["status"] for r in rows.values()} == {"sent"}
    copies = Counter(str(m[JOB_HEADER]) for _, m in received_messages(slow_sink, count=len(jobs)))
    assert copies == Counter(dict.fromkeys(ids, 1))
