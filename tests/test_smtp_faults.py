"""An SMTP server misbehaving in every way we know of: every accepted job still ends sent
exactly once, or dead with a reason."""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.faults import assert_sent_once_or_dead, dramatiq_message, publish_raw
from tests.support.ledger import dead_reasons, recipient_states, wait_dead, wait_final, wait_status
from tests.support.services import RunningWorker, delete_queues, isolated_settings, send_jobs
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import (
    DisconnectMidSession,
    RecipientLimit,
    RefuseRecipients,
    RejectAfterData,
    SilentAfterData,
    TemporaryFailures,
)

MAX_ATTEMPTS = 4


@pytest.fixture(scope="module")
def fault_settings(settings: Settings) -> Iterator[Settings]:
    """A short SMTP timeout, few attempts and quick retries, on queues of their own."""
    own = isolated_settings(
        settings,
        smtp_timeout_ms=1500,
        max_attempts=MAX_ATTEMPTS,
        min_backoff_ms=100,
        max_backoff_ms=400,
        max_job_bytes=200_000,
    )
    yield own
    delete_queues(own)


@pytest.fixture(scope="module")
def fault_worker(fault_settings: Settings) -> Iterator[RunningWorker]:
    running = RunningWorker(fault_settings, processes=1, threads=4)
    yield running
    running.stop()


@pytest.fixture(params=["unthrottled", "throttled"])
def make_tenant(request: pytest.FixtureRequest, make_tenant: Callable[..., str]) -> Callable[..., str]:
    """Every fault once for an unthrottled tenant (the whole transaction at once) and once for
    a throttled one (MAIL FROM and RCPT TO said while waiting for the series slot, DATA in it)."""

    def make(**fields: Any) -> str:
        if request.param == "throttled":
            fields.setdefault("series", {"batch_size": 1000, "pause_ms": 1})
        return make_tenant(**fields)

    return make


def tenant_on(make_tenant: Any, sink: Sink, **smtp: Any) -> str:
    tenant: str = make_tenant(
        smtp={"host": sink.host, "port": sink.port, "security": "none", "helo": "test.postbote", **smtp}
    )
    return tenant


def invoices(tenant: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com", **extra)
        for n in range(count)
    ]


def test_a_421_mid_session_is_retried_on_a_new_connection_and_every_job_arrives_once(
    fault_settings: Settings, fault_worker: RunningWorker, faulty_sink: Any, make_tenant: Any, db: Connection
) -> None:
    sink = faulty_sink(DisconnectMidSession, after=2)
    ids = send_jobs(fault_settings, invoices(tenant_on(make_tenant, sink), 8))
    rows = assert_sent_once_or_dead(db, ids, sink.handler)
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert sink.handler.disconnects >= 1


def test_451_twice_then_accepted_is_sent_once_on_the_third_attempt(
    fault_settings: Settings, fault_worker: RunningWorker, faulty_sink: Any, make_tenant: Any, db: Connection
) -> None:
    sink = faulty_sink(TemporaryFailures, times=2)
    ids = send_jobs(fault_settings, invoices(tenant_on(make_tenant, sink), 3))
    rows = assert_sent_once_or_dead(db, ids, sink.handler)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("sent", 3)}


def test_a_job_still_refused_after_the_last_attempt_is_dead_with_the_servers_reply(
    fault_settings: Settings, fault_worker: RunningWorker, faulty_sink: Any, make_tenant: Any, db: Connection
) -> None:
    sink = faulty_sink(TemporaryFailures, times=1000)
    [job_id] = send_jobs(fault_settings, invoices(tenant_on(make_tenant, sink), 1))
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["reason"] == "smtp_temporary"
    dead = db.execute("SELECT * FROM dead_letters WHERE job_id = %s", (job_id,)).fetchone()
    assert dead is not None
    assert dead["attempts"] == MAX_ATTEMPTS
    assert dead["smtp_reply"] == "451 4.3.0 Temporary local problem, try again later"
    assert f"gave up after {MAX_ATTEMPTS} failed attempts" in dead["detail"]
    assert sink.handler.data_seen.total() == MAX_ATTEMPTS


def test_550_for_one_of_three_recipients_sends_to_the_other_two_once_and_records_the_refusal(
    fault_settings: Settings, fault_worker: RunningWorker, faulty_sink: Any, make_tenant: Any, db: Connection
) -> None:
    sink = faulty_sink(RefuseRecipients, refuse={"weg@example.com"})
    job = invoices(tenant_on(make_tenant, sink), 1)[0]
    job["to"] = ["eins@example.com", "weg@example.com", "drei@example.com"]
    [job_id] = send_jobs(fault_settings, [job])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["status"] == "partial"
    assert recipient_states(db, job_id) == {
        "eins@example.com": ("to", "accepted"),
        "weg@example.com": ("to", "refused"),
        "drei@example.com": ("to", "accepted"),
    }
    assert [r.rcpt_tos for r in sink.handler.received] == [["eins@example.com", "drei@example.com"]]


def test_452_too_many_recipients_continues_in_a_new_transaction(
    fault_settings: Settings, fault_worker: RunningWorker, faulty_sink: Any, make_tenant: Any, db: Connection
) -> None:
    sink = faulty_sink(RecipientLimit, per_transaction=2)
    job = invoices(tenant_on(make_tenant, sink), 1)[0]
    job["to"] = [f"empfaenger{n}@example.com" for n in range(5)]
    [job_id] = send_jobs(fault_settings, [job])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["status"] == "sent"
    assert [len(r.rcpt_tos) for r in sink.handler.received] == [2, 2, 1]


def test_554_after_data_is_permanent_and_keeps_code_enhanced_status_and_text(
    fault_settings: Settings, fault_worker: RunningWorker, faulty_sink: Any, make_tenant: Any, db: Connection
) -> None:
    sink = faulty_sink(RejectAfterData)
    [job_id] = send_jobs(fault_settings, invoices(tenant_on(make_tenant, sink), 1))
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["reason"] == "smtp_rejected"
    assert rows[job_id]["smtp_reply"] == "554 5.7.1 Message rejected: content policy"
    assert rows[job_id]["attempts"] == 1
    assert dead_reasons(db, [job_id]) == {job_id: "smtp_rejected"}


def test_a_server_silent_after_the_final_dot_times_out_and_the_retry_delivers_once(
    fault_settings: Settings, fault_worker: RunningWorker, faulty_sink: Any, make_tenant: Any, db: Connection
) -> None:
    sink = faulty_sink(SilentAfterData, times=1, silence_s=2)
    ids = send_jobs(fault_settings, invoices(tenant_on(make_tenant, sink), 2))
    rows = assert_sent_once_or_dead(db, ids, sink.handler)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("sent", 2)}
    assert fault_worker.output().count("reason=smtp_timeout") >= 2
    deadline = time.monotonic() + 10
    while sink.handler.silences < 2 and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_job_failing_past_its_maximum_age_is_dead_with_that_reason(
    fault_settings: Settings, fault_worker: RunningWorker, faulty_sink: Any, make_tenant: Any, db: Connection
) -> None:
    sink = faulty_sink(TemporaryFailures, times=1000)
    job = invoices(tenant_on(make_tenant, sink), 1)[0]
    two_days_ago = int((time.time() - 2 * 86400) * 1000)
    publish_raw(fault_settings, dramatiq_message(fault_settings, job, message_timestamp=two_days_ago))
    rows = assert_sent_once_or_dead(db, [job["job_id"]], sink.handler)
    assert rows[job["job_id"]]["reason"] == "max_age_exceeded"
    assert "last error smtp_temporary" in rows[job["job_id"]]["detail"]
    assert sink.handler.data_seen.total() == 1


def test_an_oversized_job_on_the_queue_is_dead_lettered_naming_the_limit(
    fault_settings: Settings, fault_worker: RunningWorker, make_tenant: Any, db: Connection
) -> None:
    job = make_job(make_tenant(), "invoice", 1, user_id="u1", to="kunde@example.com", padding_bytes=210_000)
    publish_raw(fault_settings, dramatiq_message(fault_settings, job))
    dead = wait_dead(db, job["job_id"])
    assert dead["reason"] == "invalid_job"
    assert "more than the limit of 200000 bytes" in dead["detail"]


class _Logins:
    def __init__(self) -> None:
        self.attempts: list[str] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        user = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?"
        self.attempts.append(user)
        return AuthResult(success=True)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost that no trust store knows."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_a_certificate_that_does_not_verify_fails_closed_with_no_auth_and_no_mail(
    fault_settings: Settings,
    fault_worker: RunningWorker,
    faulty_sink: Any,
    make_tenant: Any,
    db: Connection,
    tmp_path: Path,
) -> None:
    import ssl

    from worker.testbed.sink.faults import FaultyHandler

    cert, key = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    logins = _Logins()
    sink = faulty_sink(
        FaultyHandler, {"tls_context": context, "require_starttls": True, "authenticator": logins}
    )
    login = {"security": "starttls", "user": "mailer@acme.example", "password": "geheim"}
    untrusted = tenant_on(make_tenant, sink, **login)
    trusted = tenant_on(make_tenant, sink, **login, ca_file=str(cert))
    [refused_id] = send_jobs(fault_settings, invoices(untrusted, 1))
    held = wait_status(db, refused_id, "held")
    assert held["reason"] == "login_failing"
    breaker = db.execute("SELECT reason FROM login_breakers WHERE tenant_id = %s", (untrusted,)).fetchone()
    assert breaker == {"reason": "tls_verify_failed"}
    assert logins.attempts == []
    assert sink.handler.mail_commands == []
    assert "geheim" not in fault_worker.output()

    # The same server with its certificate trusted: STARTTLS, AUTH and the mail go through.
    [sent_id] = send_jobs(fault_settings, invoices(trusted, 1))
    assert wait_final(db, [sent_id])[sent_id]["status"] == "sent"
    assert logins.attempts == ["mailer@acme.example"]
