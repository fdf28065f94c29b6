"""XOAUTH2 through the real pipeline: RabbitMQ → worker → STARTTLS → AUTH XOAUTH2 → the sink."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support.auth_sinks import TOKEN, USER, attempts, certificates, running, smtp_settings
from tests.support.ledger import wait_final, wait_status
from tests.support.services import RunningWorker, helper_token_file, send_jobs
from tests.support.smtp import received_messages
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job

MakeTenant = Callable[..., str]


def test_a_tenant_with_a_token_helper_sends_its_invoices_with_xoauth2(
    settings: Settings, worker: RunningWorker, make_tenant: MakeTenant, db: Connection, tmp_path: Path
) -> None:
    helper_token_file(settings).write_text(TOKEN)
    tls = certificates(tmp_path)
    with running(tmp_path, tls=tls) as auth_sink:
        tenant = make_tenant(
            smtp=smtp_settings(
                auth_sink,
                security="starttls",
                auth="xoauth2",
                token_helper="test-token",
                ca_file=str(tls.ca_file),
                # The worker quits after the mail instead of pooling the connection: aiosmtpd
                # leaks the transport of a TLS connection still open when it stops.
                max_messages_per_connection=1,
            )
        )
        job = make_job(tenant, "invoice", 1, user_id="u1", to="kunde@example.com")
        [job_id] = send_jobs(settings, [job])
        assert wait_final(db, [job_id])[job_id]["status"] == "sent"
        [(record, message)] = received_messages(auth_sink)
        assert attempts(auth_sink) == [("XOAUTH2", USER, True)]
    assert record.rcpt_tos == ["kunde@example.com"]
    assert message["Subject"] == job["subject"]


def test_a_refused_token_holds_the_job_for_a_failing_login_and_the_ledger_never_holds_the_token(
    settings: Settings, worker: RunningWorker, make_tenant: MakeTenant, db: Connection, tmp_path: Path
) -> None:
    stale = "ya29.STALE-31f0_token"
    token_file = tmp_path / "token"
    token_file.write_text(stale)
    with running(tmp_path) as auth_sink:
        tenant = make_tenant(
            smtp=smtp_settings(auth_sink, security="none", auth="xoauth2", token_file=str(token_file))
        )
        [job_id] = send_jobs(settings, [make_job(tenant, "invoice", 2, user_id="u1", to="kunde@example.com")])
        row = wait_status(db, job_id, "held")
        assert attempts(auth_sink) == [("XOAUTH2", USER, False)], (
            "one login, then the tenant's breaker is open"
        )
        assert auth_sink.handler.received == []
    assert row["reason"] == "login_failing"
    assert row["attempts"] == 0, "waiting for the login uses no attempt"
    breaker = db.execute("SELECT * FROM login_breakers WHERE tenant_id = %s", (tenant,)).fetchone()
    assert breaker is not None and breaker["reason"] == "smtp_auth_failed"
    assert db.execute("SELECT 1 FROM dead_letters WHERE job_id = %s", (job_id,)).fetchone() is None
    for value in (*row.values(), *breaker.values()):
        assert stale not in str(value)
