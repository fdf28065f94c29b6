"""2,000 jobs of every fate while workers and the relay are killed and RabbitMQ restarts: a consumer
of ``<prefix>.events`` sees, after de-duplication by ``event_id``, for every job exactly one
terminal event, ``seq`` without gaps, the ledger's statuses, and nothing for unknown jobs; a
webhook that answers 500 at first gets every event, signed, in the order they were written."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.support.faults import PrivateRabbitmq, worker_children
from tests.support.ledger import wait_final
from tests.support.services import (
    RunningWorker,
    add_tenant,
    database_url,
    delete_queues,
    isolated_settings,
    send_jobs,
)
from tests.support.webhooks import Receiver, assert_signed
from worker.db import Connection, connect, drop_database, ensure_database, upgrade
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import RecipientRules

JOBS = 2000
TERMINAL = {"sent", "partial", "failed"}


def workload(tenant: str) -> list[dict[str, Any]]:
    """Mostly plain invoices; every 10th to a refused address, every 10th to a greylisting one,
    every 20th from a sender the user may not use."""
    jobs = []
    for n in range(JOBS):
        job = make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com")
        if n % 10 == 3:
            job["to"] = [f"weg{n}@example.com"]
        elif n % 10 == 7:
            job["to"] = [f"grau{n}@example.com", f"kunde{n}@example.com"]
        elif n % 20 == 9:
            job["from"] = "chef@acme.example"
        jobs.append(job)
    return jobs


def bind_events(url: str, prefix: str) -> str:
    queue = f"{prefix}.events.chaos"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.exchange_declare(f"{prefix}.events", exchange_type="topic", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, f"{prefix}.events", routing_key="#")
    finally:
        connection.close()
    return queue


def drain(url: str, queue: str) -> list[dict[str, Any]]:
    events = []
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return events
            events.append(json.loads(body))
    finally:
        connection.close()


def wait_published(db: Connection, job_ids: list[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        row = db.execute(
            "SELECT count(*) AS n FROM events WHERE job_id = ANY(%s::uuid[]) AND published_at IS NULL",
            (job_ids,),
        ).fetchone()
        if row["n"] == 0:
            return
        assert time.monotonic() < deadline, f"{row['n']} events not published"
        time.sleep(0.5)


@pytest.fixture
def chaos_database(settings: Settings) -> Iterator[str]:
    """A database of its own: every relay publishes every event of its database."""
    url = database_url(f"postbote_chaos_{uuid.uuid4().hex[:10]}")
    ensure_database(url)
    with connect(url) as conn:
        upgrade(conn)
    yield url
    drop_database(url)


def test_every_job_has_exactly_one_terminal_event_through_kills_and_a_broker_restart(
    settings: Settings, rabbitmq: PrivateRabbitmq, chaos_database: str, tmp_path: Path
) -> None:
    # Short SMTP timeout and series wait: a killed supervisor releases no claims, so the jobs
    # its processes held are taken over only once their claims expire (series wait + 4 × timeout).
    own = isolated_settings(
        settings,
        broker_url=rabbitmq.url,
        database_url=chaos_database,
        min_backoff_ms=200,
        max_backoff_ms=1000,
        max_attempts=6,
        smtp_timeout_ms=2000,
        series_max_wait_ms=2000,
        webhook_min_backoff_ms=200,
        webhook_max_backoff_ms=1000,
    )
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    (tmp_path / "webhook.secret").write_text(secret)
    refusing_until = time.monotonic() + 15
    receiver = Receiver(lambda n: 500 if time.monotonic() < refusing_until else 200)
    rules = {f"weg{n}@example.com": ["550 5.1.1 user unknown"] for n in range(JOBS)}
    rules |= {f"grau{n}@example.com": ["451 4.7.1 greylisted", None] for n in range(JOBS)}
    sink = Sink(tmp_path / "maildir", handler=RecipientRules(tmp_path / "maildir", rules=rules))
    workers: list[RunningWorker] = []
    try:
        tenant = add_tenant(
            own.database_url,
            sink,
            tmp_path,
            archive_bcc="archiv@acme.example",
            webhooks=[{"url": receiver.url, "secret_file": str(tmp_path / "webhook.secret")}],
        )
        queue = bind_events(own.broker_url, own.queue_prefix)
        workers.append(RunningWorker(own, processes=2, threads=4))
        ids = send_jobs(own, workload(tenant))
        for kill in range(10):
            time.sleep(1.0)
            if kill in (3, 7):
                # The supervisor and its relay, then a new one.
                supervisor = workers[-1].process
                for pid in worker_children(supervisor.pid):
                    os.kill(pid, signal.SIGKILL)
                supervisor.kill()
                supervisor.wait(timeout=30)
                workers.append(RunningWorker(own, processes=2, threads=4))
            else:
                children = worker_children(workers[-1].process.pid)
                if children:
                    os.kill(children[0], signal.SIGKILL)
            if kill == 5:
                rabbitmq.stop_app()
                time.sleep(2)
                rabbitmq.start_app()
        with connect(chaos_database, autocommit=True) as db:
            rows = wait_final(db, ids, timeout=300)
            wait_published(db, ids)
            written = [
                str(r["event_id"])
                for r in db.execute("SELECT event_id FROM events WHERE tenant_id = %s ORDER BY id", (tenant,))
            ]
        time.sleep(1)
        events = drain(own.broker_url, queue)
        deadline = time.monotonic() + 180
        while len({r.event["event_id"] for r in receiver.accepted()}) < len(written):
            assert time.monotonic() < deadline, "the webhook did not get every event"
            time.sleep(0.5)
    finally:
        for worker in workers:
            worker.stop()
        sink.stop()
        receiver.stop()
        delete_queues(own)

    hooked = receiver.accepted()
    assert [r.status for r in receiver.requests][0] == 500
    assert_signed(hooked, secret)
    assert list(dict.fromkeys(r.event["event_id"] for r in hooked)) == written

    unique = {e["event_id"]: e for e in events}
    assert len(unique) <= len(events)
    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in unique.values():
        by_job[event["job_id"]].append(event)
    assert set(by_job) <= set(ids), "an event for a job the ledger does not know"
    assert set(by_job) == set(ids)
    for job_id, job_events in by_job.items():
        job_events.sort(key=lambda e: e["seq"])
        assert [e["seq"] for e in job_events] == list(range(1, len(job_events) + 1)), job_id
        terminal = [e for e in job_events if e["type"] in TERMINAL]
        assert len(terminal) == 1, (job_id, [e["type"] for e in job_events])
        ledger = rows[job_id]
        assert terminal[0]["status"] == ledger["status"], job_id
        assert job_events[-1]["status"] == ledger["status"], job_id
    statuses = {r["status"] for r in rows.values()}
    assert statuses == {"sent", "failed"}
