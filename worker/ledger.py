"""The delivery ledger: one row per job in PostgreSQL, the source of truth for "sent once".

A job is claimed before SMTP and marked after. A redelivered job whose row says
sent, partial or failed is acknowledged without sending again. A claim carries an
expiry: a claim whose holder died (expired, status still ``sending``) is taken
over by the next delivery, which sends with the same Message-ID.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from uuid import UUID

from schemas.job import Job
from worker.db import Connection, translated_errors


class Claim(StrEnum):
    CLAIMED = "claimed"
    """This delivery owns the job now and may send it."""
    TAKEN_OVER = "taken_over"
    """A dead holder's expired claim was taken over; the mail may have gone out already."""
    DONE = "done"
    """The job already ended (sent, partial or failed); acknowledge without sending."""
    BUSY = "busy"
    """Another live delivery holds the claim."""
    CONFLICT = "conflict"
    """The job id is known with a different payload."""


FINAL_STATES = ("sent", "partial", "failed")


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    attempts: int
    status: str | None = None
    busy_for_ms: int = 0
    """With ``BUSY``: how long the other delivery's claim still runs."""


def claim_job(conn: Connection, job: Job, payload_sha256: str, *, holder: str, claim_ms: int) -> ClaimResult:
    """Claim ``job`` for ``holder`` for ``claim_ms``, counting the attempt."""
    with translated_errors(), conn.transaction():
        row = conn.execute(
            """
            INSERT INTO deliveries (job_id, tenant_id, doc_type, doc_number, payload_sha256, status,
                                    attempts, claimed_by, claimed_until)
            VALUES (%s, %s, %s, %s, %s, 'sending', 1, %s, clock_timestamp() + %s * interval '1 ms')
            ON CONFLICT (job_id) DO NOTHING
            RETURNING attempts
            """,
            (
                job.job_id,
                job.tenant,
                job.document.type.value,
                job.document.number,
                payload_sha256,
                holder,
                claim_ms,
            ),
        ).fetchone()
        if row is not None:
            return ClaimResult(Claim.CLAIMED, 1)
        row = conn.execute(
            "SELECT status, attempts, payload_sha256, claimed_until < clock_timestamp() AS expired,"
            " ceil(extract(epoch FROM claimed_until - clock_timestamp()) * 1000)::bigint AS remaining_ms"
            " FROM deliveries WHERE job_id = %s FOR UPDATE",
            (job.job_id,),
        ).fetchone()
        assert row is not None
        status, attempts = str(row["status"]), int(row["attempts"])
        if row["payload_sha256"] != payload_sha256:
            return ClaimResult(Claim.CONFLICT, attempts, status)
        if status in FINAL_STATES:
            return ClaimResult(Claim.DONE, attempts, status)
        if status == "sending" and not row["expired"]:
            return ClaimResult(Claim.BUSY, attempts, status, busy_for_ms=max(1, int(row["remaining_ms"])))
        conn.execute(
            "UPDATE deliveries SET status = 'sending', attempts = attempts + 1, claimed_by = %s,"
            " claimed_until = clock_timestamp() + %s * interval '1 ms', updated_at = clock_timestamp()"
            " WHERE job_id = %s",
            (holder, claim_ms, job.job_id),
        )
        claim = Claim.TAKEN_OVER if status == "sending" else Claim.CLAIMED
        return ClaimResult(claim, attempts + 1, status)


def record_sent(
    conn: Connection,
    job_id: UUID,
    *,
    sender: str,
    recipients: list[str],
    message_id: str,
    smtp_reply: str,
    refused: dict[str, str],
) -> str:
    """Mark the job sent (or ``partial`` when some recipients were refused); returns the status."""
    status = "partial" if refused else "sent"
    with translated_errors():
        conn.execute(
            "UPDATE deliveries SET status = %s, sender = %s, recipients = %s, message_id = %s,"
            " smtp_reply = %s, refused = %s, reason = %s, detail = NULL, claimed_by = NULL,"
            " claimed_until = NULL, sent_at = clock_timestamp(), updated_at = clock_timestamp()"
            " WHERE job_id = %s",
            (
                status,
                sender,
                recipients,
                message_id,
                smtp_reply,
                json.dumps(refused) if refused else None,
                "recipients_refused" if refused else None,
                job_id,
            ),
        )
        conn.commit()
    return status


def record_failure(
    conn: Connection,
    job_id: UUID,
    *,
    final: bool,
    reason: str,
    detail: str,
    smtp_reply: str | None = None,
    sender: str | None = None,
    recipients: list[str] | None = None,
) -> None:
    """Mark the job ``failed`` (final) or ``retrying`` with the reason and the server's reply."""
    with translated_errors():
        conn.execute(
            "UPDATE deliveries SET status = %s, reason = %s, detail = %s,"
            " smtp_reply = COALESCE(%s, smtp_reply), sender = COALESCE(%s, sender),"
            " recipients = COALESCE(%s, recipients), claimed_by = NULL, claimed_until = NULL,"
            " updated_at = clock_timestamp() WHERE job_id = %s",
            ("failed" if final else "retrying", reason, detail, smtp_reply, sender, recipients, job_id),
        )
        conn.commit()


def release_claim(conn: Connection, job_id: UUID) -> None:
    """Give the claim back without an outcome: the job was deferred, a later delivery sends it."""
    with translated_errors():
        conn.execute(
            "UPDATE deliveries SET status = 'retrying', reason = 'throttled', detail = NULL, claimed_by = NULL,"
            " claimed_until = NULL, attempts = attempts - 1, updated_at = clock_timestamp()"
            " WHERE job_id = %s AND status = 'sending'",
            (job_id,),
        )
        conn.commit()


def delivery_record(conn: Connection, job_id: UUID) -> dict[str, Any] | None:
    """The ledger row of a job as shown by ``postbote status``."""
    with translated_errors():
        row = conn.execute(
            "SELECT job_id, tenant_id AS tenant, doc_type, doc_number, status, attempts, sender,"
            " recipients, refused, message_id, smtp_reply, reason, detail, created_at, updated_at,"
            " sent_at FROM deliveries WHERE job_id = %s",
            (job_id,),
        ).fetchone()
    return dict(row) if row is not None else None


__all__ = [
    "Claim",
    "ClaimResult",
    "claim_job",
    "delivery_record",
    "record_failure",
    "record_sent",
    "release_claim",
]
