"""Operators in control, through real workers, RabbitMQ, PostgreSQL and SMTP sinks: cancel
decided exactly per job, pause and resume, parked jobs across crashes and restarts, schedule and
expiry, and a throttled tenant that does not slow another."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.support.faults import PrivatePostgres, PrivateRabbitmq, copies_received, worker_children
from tests.support.ledger import wait_final
from tests.support.services import (
    RunningWorker,
    add_tenant,
    delete_queues,
    isolated_settings,
    postbote,
    send_jobs,
)
from worker.db import Connection, connect, ensure_database, upgrade
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import FaultyHandler


def letters(tenant: str, count: int, doc_type: str = "dunning", **extra: Any) -> list[dict[str, Any]]:
    return [
        make_job(tenant, doc_type, n, user_id="u1", to=f"kunde{n}@example.com", **extra) for n in range(count)
    ]


def wait_for(what: Callable[[], bool], worker: RunningWorker | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, worker.output()[-4000:] if worker else "timed out"
        time.sleep(0.1)


def statuses(db: Connection, ids: list[str]) -> Counter[str]:
    rows = db.execute("SELECT status FROM deliveries WHERE job_id = ANY(%s::uuid[])", (ids,)).fetchall()
    return Counter(r["status"] for r in rows)


def events_of(db: Connection, ids: list[str], event_type: str) -> int:
    row = db.execute(
        "SELECT count(DISTINCT job_id) AS n FROM events WHERE job_id = ANY(%s::uuid[]) AND type = %s",
        (ids, event_type),
    ).fetchone()
    assert row is not None
    return int(row["n"])


def jobs_received(sink: Sink) -> set[str]:
    """The jobs whose mail arrived; each (job, recipient) arrived exactly once."""
    copies = copies_received(sink.handler)
    assert set(copies.values()) <= {1}, [k for k, n in copies.items() if n > 1]
    return {job for job, _ in copies}


def test_cancel_during_a_throttled_run_decides_every_job_exactly(
    own_queues: Settings, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant(series={"batch_size": 50, "pause_ms": 1000}, archive_bcc="archiv@acme.example")
    ids = send_jobs(own_queues, letters(tenant, 600))
    worker = RunningWorker(own_queues, processes=2, threads=4)
    try:
        wait_for(lambda: len(sink.handler.received) >= 60, worker)
        result = postbote(
            own_queues,
            "cancel",
            "--tenant",
            tenant,
            "--doc-type",
            "dunning",
            "--wait",
            "--json",
            "--reason",
            "wrong template",
        )
        assert result.returncode == 0, result.stderr
        counts = json.loads(result.stdout)
        received_then = len(sink.handler.received)
        time.sleep(3)
        received = jobs_received(sink)
    finally:
        worker.stop()
    assert len(sink.handler.received) == received_then, "a mail arrived after 'cancel --wait' returned"
    assert counts["cancelled"] + len(received) == 600
    assert counts["already_sent"] + counts["in_flight_then_sent"] == len(received)
    assert counts["cancelled"] > 0 and counts["waiting"] == 0 and counts["in_flight"] == 0
    assert statuses(db, ids) == Counter({"cancelled": counts["cancelled"], "sent": len(received)})
    assert events_of(db, ids, "cancelled") == counts["cancelled"]
    row = db.execute(
        "SELECT d.detail, c.created_by, c.reason FROM deliveries d JOIN directives c ON c.id = d.cancelled_by"
        " WHERE d.job_id = ANY(%s::uuid[]) LIMIT 1",
        (ids,),
    ).fetchone()
    assert row is not None and row["reason"] == "wrong template" and "@" in row["created_by"]


def test_pause_holds_a_tenants_letters_lets_receipts_through_and_resume_sends_the_rest_once_in_order(
    own_queues: Settings, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant(archive_bcc="archiv@acme.example", cc_clerk=True)
    paused = postbote(own_queues, "pause", "--tenant", tenant, "--reason", "wrong customer group")
    assert paused.returncode == 0, paused.stderr
    held_ids = send_jobs(own_queues, letters(tenant, 12))
    receipt_ids = send_jobs(own_queues, letters(tenant, 3, doc_type="receipt"))
    worker = RunningWorker(own_queues, processes=1, threads=1)
    try:
        rows = wait_final(db, receipt_ids, timeout=60)
        assert {r["status"] for r in rows.values()} == {"sent"}
        wait_for(lambda: statuses(db, held_ids) == Counter({"held": 12}), worker)
        assert events_of(db, held_ids, "held") == 12
        listed = postbote(own_queues, "jobs", "--tenant", tenant, "--status", "held", "--json")
        jobs = json.loads(listed.stdout)
        assert len(jobs["jobs"]) == 12 and {j["reason"] for j in jobs["jobs"]} == {"paused"}
        assert jobs["pauses"][0]["reason"] == "wrong customer group"
        assert len(sink.handler.received) == 3
        resumed = postbote(own_queues, "resume", "--tenant", tenant)
        assert resumed.returncode == 0 and "12 held jobs released" in resumed.stdout
        rows = wait_final(db, held_ids, timeout=60)
    finally:
        worker.stop()
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert {(r["attempts"]) for r in rows.values()} == {1}
    assert len(jobs_received(sink)) == 15
    arrived = [r.rcpt_tos[0] for r in sink.handler.received[3:]]
    assert arrived == [f"kunde{n}@example.com" for n in range(12)]
    assert events_of(db, held_ids, "released") == 12


def test_a_job_waits_for_not_before_and_one_past_expires_at_ends_expired(
    own_queues: Settings, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    now = datetime.now(UTC)
    later = now + timedelta(seconds=8)
    [scheduled] = send_jobs(own_queues, letters(tenant, 1, doc_type="invoice", not_before=later.isoformat()))
    [stale] = send_jobs(
        own_queues, letters(tenant, 1, doc_type="offer", expires_at=(now - timedelta(seconds=1)).isoformat())
    )
    postbote(own_queues, "pause", "--tenant", tenant, "--doc-type", "dunning")
    [expiring] = send_jobs(
        own_queues, letters(tenant, 1, expires_at=(now + timedelta(seconds=4)).isoformat())
    )
    worker = RunningWorker(own_queues, processes=1, threads=2)
    try:
        wait_for(lambda: statuses(db, [scheduled]) == Counter({"scheduled": 1}), worker)
        rows = wait_final(db, [stale, expiring], timeout=60)
        assert rows[stale]["status"] == "expired" and rows[expiring]["status"] == "expired"
        rows = wait_final(db, [scheduled], timeout=60)
    finally:
        worker.stop()
    assert rows[scheduled]["status"] == "sent"
    [mail] = sink.handler.received
    assert mail.arrived_at >= later.timestamp()
    assert events_of(db, [scheduled], "scheduled") == 1
    assert events_of(db, [stale, expiring], "expired") == 2


def test_a_throttled_tenant_neither_slows_another_nor_opens_an_envelope_per_wait(
    own_queues: Settings, sink: Sink, faulty_sink: Callable[..., Sink], db: Connection, tmp_path: Path
) -> None:
    slow_sink = faulty_sink(FaultyHandler)
    assert isinstance(slow_sink.handler, FaultyHandler)
    slow = add_tenant(
        own_queues.database_url, slow_sink, tmp_path, series={"batch_size": 10, "pause_ms": 20_000}
    )
    fast = add_tenant(own_queues.database_url, sink, tmp_path)
    slow_ids = send_jobs(own_queues, letters(slow, 300))
    fast_ids = send_jobs(own_queues, letters(fast, 40, doc_type="invoice"))
    worker = RunningWorker(own_queues, processes=1, threads=4)
    try:
        wait_final(db, fast_ids, timeout=120)
        first_series = len(slow_sink.handler.received)
        wait_for(lambda: statuses(db, slow_ids)["retrying"] >= 280, worker)
        parked = db.execute(
            "SELECT count(*) AS n FROM parked_jobs WHERE tenant_id = %s AND reason = 'series'", (slow,)
        ).fetchone()
    finally:
        worker.stop()
    # The other tenant's invoices all went out while the throttled tenant was still in its first series.
    assert first_series <= 10
    assert parked is not None and parked["n"] >= 280
    assert len(slow_sink.handler.mail_commands) <= len(slow_sink.handler.received) + 4


def test_parked_jobs_survive_killed_workers_and_restarts_of_rabbitmq_and_postgresql(
    settings: Settings, rabbitmq: PrivateRabbitmq, postgres: PrivatePostgres, sink: Sink, tmp_path: Path
) -> None:
    own = isolated_settings(settings, broker_url=rabbitmq.url, database_url=postgres.url("postbote_parked"))
    ensure_database(own.database_url)
    with connect(own.database_url) as conn:
        upgrade(conn)
    tenant = add_tenant(own.database_url, sink, tmp_path, archive_bcc="archiv@acme.example")
    assert postbote(own, "pause", "--tenant", tenant).returncode == 0
    ids = send_jobs(own, letters(tenant, 20))
    worker = RunningWorker(own, processes=2, threads=2)
    try:
        with connect(own.database_url, autocommit=True) as db:
            wait_for(lambda: statuses(db, ids) == Counter({"held": 20}), worker)
        for pid in [*worker_children(worker.process.pid), worker.process.pid]:
            with_signal(pid, signal.SIGKILL)
        worker.process.wait(timeout=30)
        rabbitmq.stop_app()
        rabbitmq.start_app()
        postgres.stop()
        postgres.start()
        worker = RunningWorker(own, processes=2, threads=2)
        assert postbote(own, "resume", "--tenant", tenant).returncode == 0
        with connect(own.database_url, autocommit=True) as db:
            rows = wait_final(db, ids, timeout=120)
    finally:
        worker.stop()
        delete_queues(own)
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert jobs_received(sink) == set(ids)
    assert len(copies_received(sink.handler)) == 40


def with_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
