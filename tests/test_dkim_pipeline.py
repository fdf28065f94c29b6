"""Mails sent through the real pipeline carry DKIM signatures two independent verifiers accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.dkim import dkimpy_verify, perl_verify
from tests.support.ledger import wait_final
from tests.support.services import RunningWorker, send_jobs
from tests.support.smtp import received_messages
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.tools.dkim_keys import dns_record, generate_private_key, private_key_pem


def test_a_sent_invoice_with_attachment_and_umlauts_verifies_with_dkimpy_and_mail_dkim(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection, tmp_path: Path
) -> None:
    key = generate_private_key("rsa", 2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(private_key_pem(key))
    record = dns_record("acme.example", "s2026", key)
    tenant = make_tenant(
        dkim={"domain": "acme.example", "selector": "s2026", "private_key_file": str(key_file)}
    )
    job = make_job(
        tenant, "invoice", 1, user_id="u1", to="kunde@example.com", subject="Rechnung für Müller & Söhne"
    )
    job["body"]["text"] = "Zeile " + "x" * 300 + "\nÄnderungen vorbehalten.\n"
    [job_id] = send_jobs(settings, [job])
    assert wait_final(db, [job_id])[job_id]["status"] == "sent"

    [(record_in, _)] = received_messages(sink)
    raw = (sink.handler.maildir / record_in.file).read_bytes()
    assert raw.startswith(b"DKIM-Signature:")
    assert dkimpy_verify(raw, record) == [True]
    assert perl_verify(raw, record).overall == "pass"
