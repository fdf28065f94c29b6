"""Ledger rows and their events written directly, for the relay and events CLI tests."""

from __future__ import annotations

import uuid

from worker.db import Connection


def new_job(conn: Connection, tenant: str, doc_type: str = "invoice", number: str = "RE-2026-0001") -> str:
    """A ledger row (sending, one ``to`` recipient) for a fresh job; returns its id."""
    job_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO deliveries (job_id, tenant_id, doc_type, doc_number, payload_sha256, status, message_id)"
        " VALUES (%s, %s, %s, %s, 'test', 'sending', %s)",
        (job_id, tenant, doc_type, number, f"<{job_id}@postbote.test>"),
    )
    conn.execute(
        "INSERT INTO delivery_recipients (job_id, address, position, role, state)"
        " VALUES (%s, 'kunde@example.com', 0, 'to', 'pending')",
        (job_id,),
    )
    return job_id


def emit(conn: Connection, job_id: str, event_type: str, status: str, reason: str | None = None) -> None:
    """Change the job's ledger state and write its event, as the ledger does."""
    with conn.transaction():
        conn.execute(
            "UPDATE deliveries SET status = %s, reason = %s, attempts = attempts + 1 WHERE job_id = %s",
            (status, reason, job_id),
        )
        conn.execute("SELECT postbote_emit_event(%s, %s)", (job_id, event_type))


__all__ = ["emit", "new_job"]
