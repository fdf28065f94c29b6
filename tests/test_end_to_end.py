"""A document job travels producer → RabbitMQ → worker → PostgreSQL → SMTP and is recorded."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from tests.support.ledger import wait_final
from tests.support.services import RunningWorker, postbote, send_jobs
from tests.support.smtp import received_messages
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink


def test_published_jobs_arrive_with_headers_and_intact_attachments(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    jobs = [make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com") for n in range(12)]
    ids = send_jobs(settings, jobs)
    rows = wait_final(db, ids)
    assert {r["status"] for r in rows.values()} == {"sent"}

    messages = received_messages(sink, count=len(jobs))
    assert len(messages) == len(jobs)
    by_job = {str(m["X-Postbote-Job"]): (record, m) for record, m in messages}
    for job in jobs:
        record, message = by_job[job["job_id"]]
        assert record.rcpt_tos == job["to"]
        assert record.mail_from == "anna@acme.example"
        assert message["Subject"] == job["subject"]
        assert message["To"] == job["to"][0]
        assert message["X-Postbote-Document"] == f"invoice {job['document']['number']}"
        attachment = next(message.iter_attachments())
        assert attachment.get_filename() == job["attachments"][0]["filename"]
        assert attachment.get_content() == base64.b64decode(job["attachments"][0]["content_base64"])
        assert message.get_body(("plain",)).get_content().startswith("Sehr geehrte")
        assert "anbei erhalten Sie" in message.get_body(("html",)).get_content()
        assert rows[job["job_id"]]["message_id"] == message["Message-ID"]


def test_status_shows_the_delivery_record(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    [job_id] = send_jobs(settings, [make_job(tenant, "offer", 1, user_id="u1", to="kunde@example.com")])
    wait_final(db, [job_id])
    result = postbote(settings, "status", job_id)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "sent"
    assert record["sender"] == "anna@acme.example"
    [recipient] = record["recipients"]
    assert (recipient["address"], recipient["role"], recipient["state"]) == (
        "kunde@example.com",
        "to",
        "accepted",
    )
    assert recipient["reply"].startswith("250")
    [attempt] = record["history"]
    assert attempt["outcome"] == "sent"
    assert attempt["recipients"] == [
        {"address": "kunde@example.com", "role": "to", "reply": recipient["reply"]}
    ]
    assert record["smtp_reply"].startswith("250")
    assert record["next_attempt_at"] is None


def test_status_of_an_unknown_job_says_no_worker_has_seen_it(settings: Settings) -> None:
    result = postbote(settings, "status", "00000000-0000-0000-0000-000000000000")
    assert result.returncode == 1
    assert "no worker has seen it yet" in result.stderr


def test_status_by_document_lists_its_jobs_newest_first(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    first = make_job(tenant, "invoice", 7, user_id="u1", to="kunde@example.com")
    again = {**make_job(tenant, "invoice", 7, user_id="u1", to="kunde@example.com")}
    ids = send_jobs(settings, [first])
    wait_final(db, ids)
    ids += send_jobs(settings, [again])
    wait_final(db, ids)
    result = postbote(
        settings, "status", "--document", "invoice", first["document"]["number"], "--tenant", tenant
    )
    assert result.returncode == 0, result.stderr
    assert [r["job_id"] for r in json.loads(result.stdout)] == ids[::-1]
    unknown = postbote(settings, "status", "--document", "invoice", "RE-0000-NONE", "--tenant", tenant)
    assert unknown.returncode == 1
    assert "no worker has seen one yet" in unknown.stderr
    assert postbote(settings, "status", "--document", "bill", "1").returncode == 2


def test_a_redelivered_job_is_not_sent_twice(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    job = make_job(tenant, "invoice", 1, user_id="u1", to="kunde@example.com")
    [job_id] = send_jobs(settings, [job])
    wait_final(db, [job_id])
    send_jobs(settings, [job])
    deadline = time.monotonic() + 30
    while f"duplicate_prevented job_id={job_id}" not in worker.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"duplicate_prevented job_id={job_id}" in worker.output()
    assert [str(m["X-Postbote-Job"]) for _, m in received_messages(sink)].count(job_id) == 1
