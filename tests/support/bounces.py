"""Bounce tests' ledger rows and report files: a job the relay accepted, and the hand-written
corpus in ``tests/fixtures/bounces`` filled in for it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from worker.db import Connection

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "bounces"
DOMAIN = "acme.example"


def accepted_job(
    conn: Connection, tenant: str, *customers: str, doc_type: str = "invoice", archive: str | None = None
) -> str:
    """A ``sent`` ledger row whose customers (``to``) and archive copy the relay accepted; returns its id."""
    job_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO deliveries (job_id, tenant_id, doc_type, doc_number, payload_sha256, status, attempts,"
        " message_id, smtp_reply, sent_at) VALUES (%s, %s, %s, %s, 'test', 'sent', 1, %s, '250 2.0.0 Ok', now())",
        (job_id, tenant, doc_type, f"RE-{job_id[:8]}", f"<{job_id}@{DOMAIN}>"),
    )
    roles = [(a, "to") for a in customers] + ([(archive, "archive")] if archive else [])
    for position, (address, role) in enumerate(roles):
        conn.execute(
            "INSERT INTO delivery_recipients (job_id, address, position, role, state, reply_code,"
            " reply_enhanced, reply_text, attempts) VALUES (%s, %s, %s, %s, 'accepted', 250, '2.0.0', 'Ok', 1)",
            (job_id, address, position, role),
        )
    return job_id


def corpus_report(name: str, job_id: str, *, to: str, other_job: str | None = None) -> bytes:
    """The corpus file ``name`` filled in for ``job_id`` and its customer ``to``, CRLF line ends."""
    text = (CORPUS / name).read_text(encoding="utf-8")
    for placeholder, value in (
        ("$JOBHEX", uuid.UUID(job_id).hex),
        ("$JOB2", other_job or str(uuid.uuid4())),
        ("$JOB", job_id),
        ("$TO", to),
        ("$OTHER", "nobody-of-this-job@example.org"),
        ("$DOMAIN", DOMAIN),
        ("$REPORT", uuid.uuid4().hex),
    ):
        text = text.replace(placeholder, value)
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def expected_classes() -> dict[str, list[str]]:
    """Each corpus file and the classes its matched recipients must get (``[]``: no match)."""
    data: dict[str, list[str]] = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
    return data


def events_of(conn: Connection, job_id: str) -> list[dict[str, Any]]:
    return conn.execute("SELECT type, body FROM events WHERE job_id = %s ORDER BY seq", (job_id,)).fetchall()


__all__ = ["CORPUS", "DOMAIN", "accepted_job", "corpus_report", "events_of", "expected_classes"]
