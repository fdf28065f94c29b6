"""Series limits through the real pipeline: several worker processes, one global limit per tenant."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.ledger import wait_final
from tests.support.ratelimit import oversized
from tests.support.services import RunningWorker, send_jobs
from tests.support.smtp import received_messages
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink


def jobs_for(tenant: str, count: int, doc_type: str = "dunning") -> list[dict[str, Any]]:
    return [make_job(tenant, doc_type, n, user_id="u1", to=f"kunde{n}@example.com") for n in range(count)]


def arrivals(sink: Sink, tenant_rcpts: str = "") -> list[float]:
    return sorted(r.arrived_at for r in sink.handler.received if tenant_rcpts in ",".join(r.rcpt_tos))


def test_the_series_limit_holds_across_two_worker_invocations_of_two_processes(
    own_queues: Settings, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant(series={"batch_size": 4, "pause_ms": 300})
    ids = send_jobs(own_queues, jobs_for(tenant, 40))
    workers = [RunningWorker(own_queues, processes=2, threads=3) for _ in range(2)]
    try:
        rows = wait_final(db, ids, timeout=120)
    finally:
        for w in workers:
            w.stop()
    assert {r["status"] for r in rows.values()} == {"sent"}
    times = arrivals(sink)
    assert len(times) == 40
    assert oversized(times, batch_size=4, pause_ms=300) == []


def test_a_busy_tenant_does_not_slow_down_another(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    slow = make_tenant(series={"batch_size": 1, "pause_ms": 1000})
    fast = make_tenant()
    slow_ids = send_jobs(settings, jobs_for(slow, 5))
    fast_ids = send_jobs(settings, jobs_for(fast, 10))
    fast_rows = wait_final(db, fast_ids, timeout=60)
    slow_rows = wait_final(db, slow_ids, timeout=60)
    assert max(r["sent_at"] for r in fast_rows.values()) < max(r["sent_at"] for r in slow_rows.values())


def test_throttled_jobs_wait_without_using_up_a_retry(
    own_queues: Settings, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant(series={"batch_size": 1, "pause_ms": 700})
    ids = send_jobs(own_queues, jobs_for(tenant, 4))
    worker = RunningWorker(own_queues, processes=1, threads=4, max_attempts=1, series_max_wait_ms=0)
    try:
        rows = wait_final(db, ids, timeout=60)
    finally:
        worker.stop()
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("sent", 1)}
    assert "outcome=parked" in worker.output() or '"outcome": "parked"' in worker.output()
    assert oversized(arrivals(sink), batch_size=1, pause_ms=700) == []


def test_a_killed_worker_neither_blocks_the_tenant_nor_breaks_the_limit(
    own_queues: Settings, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant(series={"batch_size": 3, "pause_ms": 300})
    ids = send_jobs(own_queues, jobs_for(tenant, 30))
    short = {"series_lease_ms": 3000, "smtp_timeout_ms": 1000, "series_max_wait_ms": 2000}
    doomed = RunningWorker(own_queues, processes=2, threads=2, **short)
    survivor = RunningWorker(own_queues, processes=2, threads=2, **short)
    try:
        while len(sink.handler.received) < 7:
            time.sleep(0.02)
        for pid in [*_children(doomed.process.pid), doomed.process.pid]:
            os.kill(pid, signal.SIGKILL)
        doomed.stop()
        rows = wait_final(db, ids, timeout=120)
    finally:
        survivor.stop()
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert oversized(arrivals(sink), batch_size=3, pause_ms=300) == []
    sent_per_job = Counter(str(m["X-Postbote-Job"]) for _, m in received_messages(sink))
    assert set(sent_per_job) == set(ids)
    for job_id, count in sent_per_job.items():
        if count > 1:
            assert rows[job_id]["attempts"] > 1, (
                "only a job taken over from the killed worker may arrive twice"
            )


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []
