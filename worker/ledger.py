"""The delivery ledger: one row per job in PostgreSQL, the source of truth for "sent once".

A job is claimed before SMTP and marked after. A redelivered job whose row says
sent, partial or failed is acknowledged without sending again.

The stale-claim rule: a claim carries an expiry (``claimed_until``), longer than
a live worker can take from claim to ledger write. A claim still ``sending``
after its expiry, or released by the supervisor that saw its process die,
belongs to a dead worker; the next delivery takes it over and sends with the
same Message-ID (counted as a possible duplicate). Each takeover is counted in
``takeovers``; when deliveries of a job have ended with a dead worker
``crash_loop_after`` times, the job is not tried again (``Claim.CRASH_LOOP``).
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
    CRASH_LOOP = "crash_loop"
    """Deliveries of this job keep killing their worker; stop trying."""


FINAL_STATES = ("sent", "partial", "failed")


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    attempts: int
    status: str | None = None
    remaining_ms: int = 0
    """For ``BUSY``: how long the other holder's claim still runs."""
    takeovers: int = 0


def claim_job(
    conn: Connection,
    job: Job,
    payload_sha256: str,
    *,
    holder: str,
    claim_ms: int,
    crash_loop_after: int = 3,
) -> ClaimResult:
    """Claim ``job`` for ``holder`` for ``claim_ms``, counting the attempt (see the stale-claim rule).

    A job seen for the first time costs one statement; only a redelivery takes the row lock.
    """
    with translated_errors():
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
    with translated_errors(), conn.transaction():
        row = conn.execute(
            "SELECT status, attempts, takeovers, payload_sha256,"
            " COALESCE(claimed_until < clock_timestamp(), true) AS expired,"
            " GREATEST(0, EXTRACT(EPOCH FROM claimed_until - clock_timestamp()) * 1000)::bigint AS remaining"
            " FROM deliveries WHERE job_id = %s FOR UPDATE",
            (job.job_id,),
        ).fetchone()
        assert row is not None
        status, attempts, takeovers = str(row["status"]), int(row["attempts"]), int(row["takeovers"])
        if row["payload_sha256"] != payload_sha256:
            return ClaimResult(Claim.CONFLICT, attempts, status)
        if status in FINAL_STATES:
            return ClaimResult(Claim.DONE, attempts, status)
        if status == "sending" and not row["expired"]:
            return ClaimResult(Claim.BUSY, attempts, status, remaining_ms=int(row["remaining"] or 0))
        taking_over = status == "sending"
        if taking_over and takeovers + 1 >= crash_loop_after:
            return ClaimResult(Claim.CRASH_LOOP, attempts, status, takeovers=takeovers + 1)
        conn.execute(
            "UPDATE deliveries SET status = 'sending', attempts = attempts + 1, takeovers = takeovers + %s,"
            " claimed_by = %s, claimed_until = clock_timestamp() + %s * interval '1 ms',"
            " updated_at = clock_timestamp() WHERE job_id = %s",
            (int(taking_over), holder, claim_ms, job.job_id),
        )
        claim = Claim.TAKEN_OVER if taking_over else Claim.CLAIMED
        return ClaimResult(claim, attempts + 1, status, takeovers=takeovers + int(taking_over))


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
            " updated_at = clock_timestamp() WHERE job_id = %s AND status NOT IN ('sent', 'partial')",
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


def record_given_up(
    conn: Connection, job: Job, payload_sha256: str, *, reason: str, detail: str, smtp_reply: str | None
) -> bool:
    """Mark a job ``failed`` after its retries ran out, creating the row if no attempt got as
    far as a claim. False when the ledger says it was sent meanwhile (then it is not dead)."""
    with translated_errors():
        row = conn.execute(
            """
            INSERT INTO deliveries (job_id, tenant_id, doc_type, doc_number, payload_sha256, status,
                                    reason, detail, smtp_reply)
            VALUES (%s, %s, %s, %s, %s, 'failed', %s, %s, %s)
            ON CONFLICT (job_id) DO UPDATE SET status = 'failed', reason = EXCLUDED.reason,
                detail = EXCLUDED.detail, smtp_reply = COALESCE(EXCLUDED.smtp_reply, deliveries.smtp_reply),
                claimed_by = NULL, claimed_until = NULL, updated_at = clock_timestamp()
            WHERE deliveries.status NOT IN ('sent', 'partial')
            RETURNING job_id
            """,
            (
                job.job_id,
                job.tenant,
                job.document.type.value,
                job.document.number,
                payload_sha256,
                reason,
                detail,
                smtp_reply,
            ),
        ).fetchone()
        conn.commit()
    return row is not None


def renew_claim(conn: Connection, job_id: UUID, *, holder: str, claim_ms: int) -> bool:
    """Extend ``holder``'s claim by ``claim_ms`` from now; False when it is no longer ours."""
    with translated_errors():
        row = conn.execute(
            "UPDATE deliveries SET claimed_until = clock_timestamp() + %s * interval '1 ms'"
            " WHERE job_id = %s AND claimed_by = %s AND status = 'sending' RETURNING job_id",
            (claim_ms, job_id, holder),
        ).fetchone()
        conn.commit()
    return row is not None


def release_claims(conn: Connection, holder: str) -> int:
    """Expire every claim of ``holder`` (a worker process known to be dead); returns how many."""
    with translated_errors():
        cursor = conn.execute(
            "UPDATE deliveries SET claimed_until = clock_timestamp() - interval '1 ms'"
            " WHERE claimed_by = %s AND status = 'sending'",
            (holder,),
        )
        conn.commit()
    return cursor.rowcount


def reopen_failed(conn: Connection, job_id: UUID) -> str | None:
    """Let a ``failed`` job be sent once more (replay): it becomes ``retrying`` with its
    crash counter reset. Returns the status the job had (``None`` without a ledger row);
    any other status is left alone, so the ledger still refuses a second send.

    Runs in the caller's transaction.
    """
    with translated_errors():
        row = conn.execute("SELECT status FROM deliveries WHERE job_id = %s FOR UPDATE", (job_id,)).fetchone()
        if row is None:
            return None
        if row["status"] == "failed":
            conn.execute(
                "UPDATE deliveries SET status = 'retrying', reason = 'replayed', takeovers = 0,"
                " claimed_by = NULL, claimed_until = NULL, updated_at = clock_timestamp() WHERE job_id = %s",
                (job_id,),
            )
    return str(row["status"])


def delivery_record(conn: Connection, job_id: UUID) -> dict[str, Any] | None:
    """The ledger row of a job as shown by ``postbote status``."""
    with translated_errors():
        row = conn.execute(
            "SELECT job_id, tenant_id AS tenant, doc_type, doc_number, status, attempts, takeovers, sender,"
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
    "record_given_up",
    "record_sent",
    "release_claims",
    "renew_claim",
    "reopen_failed",
]
