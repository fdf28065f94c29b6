"""Queue depth and oldest-message age: computed by the supervisor, once per host, for every queue."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.constants import METRIC_QUEUE_MESSAGES, METRIC_QUEUE_OLDEST_AGE_SECONDS
from tests.support.ledger import wait_final
from tests.support.observe import http_get, sample, wait_for, wait_metrics
from tests.support.services import RunningWorker, send_jobs
from worker.db import Connection
from worker.runtime.queue_gauges import StartedMarks, oldest_age
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.slow import SlowHandler


def test_an_empty_queue_has_no_age() -> None:
    assert oldest_age(0, newest_started=10.0, last_seen_empty=5.0, now=100.0) == 0.0


def test_the_age_counts_from_the_newest_started_message_when_it_is_later() -> None:
    assert oldest_age(3, newest_started=90.0, last_seen_empty=50.0, now=100.0) == 10.0


def test_the_age_counts_from_when_the_queue_was_last_seen_empty_when_that_is_later() -> None:
    assert oldest_age(3, newest_started=40.0, last_seen_empty=80.0, now=100.0) == 20.0
    assert oldest_age(3, newest_started=None, last_seen_empty=80.0, now=100.0) == 20.0


def test_started_marks_keep_the_newest_enqueue_time_per_lane() -> None:
    marks = StartedMarks(multiprocessing.get_context("spawn"))
    marks.record("documents", 200.0)
    marks.record("documents", 150.0)
    assert marks.newest("documents") == 200.0
    assert marks.newest("receipts") is None


@pytest.fixture
def slow_sink(tmp_path: Path) -> Iterator[Sink]:
    running = Sink(tmp_path / "slow", handler=SlowHandler(tmp_path / "slow", delay_s=1.0))
    yield running
    running.stop()


def _gauges(port: int) -> dict[str, tuple[float | None, float | None]]:
    text = http_get(port, "/metrics")[1]
    return {
        queue: (
            sample(text, METRIC_QUEUE_MESSAGES, queue=queue),
            sample(text, METRIC_QUEUE_OLDEST_AGE_SECONDS, queue=queue),
        )
        for queue in ("documents", "receipts", "dead")
    }


def test_a_backlog_shows_as_waiting_messages_with_a_growing_age_then_drains_to_zero(
    own_queues: Settings, slow_sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant(
        smtp={"host": slow_sink.host, "port": slow_sink.port, "security": "none", "helo": "test.postbote"}
    )
    running = RunningWorker(own_queues, threads=1, queue_stats_interval_ms=200)
    try:
        wait_metrics(running.metrics_port)
        published_at = time.time()
        ids = send_jobs(
            own_queues,
            [make_job(tenant, "order", n, user_id="u1", to="k@example.com") for n in range(7)],
        )

        def backlog_older_than_a_second() -> tuple[float, float] | None:
            waiting, age = _gauges(running.metrics_port)["documents"]
            return (waiting, age) if waiting and age is not None and age >= 1.0 else None

        waiting, age = wait_for(backlog_older_than_a_second, timeout=20, what="aged backlog")
        assert 1 <= waiting <= 6
        assert age <= time.time() - published_at + 0.5
        assert _gauges(running.metrics_port)["receipts"] == (0.0, 0.0)

        wait_final(db, ids)
        assert wait_for(
            lambda: _gauges(running.metrics_port)["documents"] == (0.0, 0.0), timeout=10, what="drained queue"
        )
    finally:
        running.stop()


def test_the_dead_gauge_counts_the_dead_letter_store(
    own_queues: Settings, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    running = RunningWorker(own_queues, threads=1, queue_stats_interval_ms=200)
    try:
        job = make_job(
            tenant, "invoice", 1, user_id="u1", to="k@example.com", **{"from": "x@elsewhere.example"}
        )
        [job_id] = send_jobs(own_queues, [job])
        assert wait_final(db, [job_id])[job_id]["reason"] == "sender_not_permitted"
        row = db.execute(
            "SELECT count(*) AS n, extract(epoch FROM now() - min(dead_at))::float8 AS age FROM dead_letters"
        ).fetchone()
        assert row is not None

        def dead_reading() -> tuple[float, float] | None:
            count, age = _gauges(running.metrics_port)["dead"]
            return (count, age) if count >= row["n"] and age is not None else None

        count, age = wait_for(dead_reading, timeout=20, what="dead-letter gauge")
        # The gauge read the age at its last refresh, a moment before or after this query.
        assert row["age"] - 5 <= age <= row["age"] + 20
    finally:
        running.stop()
