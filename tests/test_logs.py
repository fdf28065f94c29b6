"""One log line per job outcome, JSON when asked, and never a message body or a password."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support.ledger import wait_final
from tests.support.observe import wait_for
from tests.support.services import RunningWorker, send_jobs
from worker.db import Connection
from worker.logs import OUTCOME_FIELDS
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink, free_port

PASSWORD = "Pw-9f3c1e-never-logged"
BODY_TEXT = "Vertraulicher Inhalt 58213 nur für den Kunden"


def _accept_mailer(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data.password == PASSWORD.encode()
    return AuthResult(success=ok)


@pytest.fixture
def auth_sink(tmp_path: Path) -> Iterator[Sink]:
    running = Sink(tmp_path / "auth", authenticator=_accept_mailer, auth_require_tls=False)
    yield running
    running.stop()


def test_a_json_worker_logs_one_parseable_outcome_line_without_body_or_password(
    own_queues: Settings, auth_sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant(
        smtp={
            "host": auth_sink.host,
            "port": auth_sink.port,
            "security": "none",
            "user": "mailer@acme.example",
            "password": PASSWORD,
            "helo": "test.postbote",
        }
    )
    job = make_job(tenant, "invoice", 7, user_id="u1", to="kunde@example.com")
    job["body"] = {"text": BODY_TEXT, "html": f"<p>{BODY_TEXT}</p>"}
    running = RunningWorker(own_queues, threads=1, log_format="json")
    try:
        [job_id] = send_jobs(own_queues, [job])
        assert wait_final(db, [job_id])[job_id]["status"] == "sent"
        wait_for(lambda: job_id in running.output(), timeout=10, what="the outcome line")
    finally:
        running.stop()
    log = running.output()

    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    outcomes = [r for r in records if r["logger"] == "postbote.outcome" and r["job_id"] == job_id]
    assert len(outcomes) == 1
    [line] = outcomes
    assert set(OUTCOME_FIELDS) | {"outcome", "time", "level"} <= set(line)
    assert line["outcome"] == "sent"
    assert line["tenant"] == tenant
    assert line["document"] == f"invoice {job['document']['number']}"
    assert line["sender"] == "anna@acme.example"
    assert line["reason"] is None
    assert line["smtp_reply"].startswith("250")
    assert isinstance(line["duration_ms"], int) and line["duration_ms"] >= 0

    assert PASSWORD not in log
    assert "Vertraulicher Inhalt" not in log


def test_a_failing_send_logs_the_job_id_but_never_the_job_itself(
    own_queues: Settings, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant(
        smtp={"host": "127.0.0.1", "port": free_port(), "security": "none", "helo": "test.postbote"}
    )
    job = make_job(tenant, "invoice", 8, user_id="u1", to="kunde@example.com")
    job["body"] = {"text": BODY_TEXT}
    running = RunningWorker(own_queues, threads=1, log_format="json")
    try:
        [job_id] = send_jobs(own_queues, [job])
        wait_for(lambda: "Failed to process message" in running.output(), timeout=30, what="dramatiq's error")
    finally:
        running.stop()
    records = [json.loads(line) for line in running.output().splitlines() if line.strip()]

    retrying = [r for r in records if r["logger"] == "postbote.outcome" and r["outcome"] == "retrying"]
    assert retrying and retrying[0]["reason"] == "smtp_connection"
    failures = [r["message"] for r in records if r["message"].startswith("Failed to process message")]
    assert failures and all(f"send_document[{job_id}]" in m for m in failures)
    assert "Vertraulicher Inhalt" not in running.output()
    assert job["attachments"][0]["content_base64"][:40] not in running.output()
