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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any
from uuid import UUID

from schemas.job import Job
from worker.db import Connection, storable, translated_errors
from worker.errors import ClaimedElsewhere
from worker.job.ledger_batch import LedgerBatcher, call_alone
from worker.job.outcome import AttemptRecord, Fate, Verdict, out_of_attempts
from worker.job.recipients import Recipient
from worker.job.smtp import SmtpReply
from worker.vocabulary import DELIVERED, EventType, Reason, RecipientState, Status


class Claim(StrEnum):
    CLAIMED = "claimed"
    """This delivery owns the job now and may send it."""
    TAKEN_OVER = "taken_over"
    """A dead holder's expired claim was taken over; the mail may have gone out already."""
    DONE = "done"
    """The job already ended (sent, partial, failed, cancelled or expired); acknowledge without sending."""
    BUSY = "busy"
    """Another live delivery holds the claim."""
    CONFLICT = "conflict"
    """The job id is known with a different payload."""
    CRASH_LOOP = "crash_loop"
    """Deliveries of this job keep killing their worker; stop trying."""
    CANCELLED = "cancelled"
    """A cancel directive matched: the job ended here, unsent."""
    EXPIRED = "expired"
    """The job's ``expires_at`` passed: it ended here, unsent."""
    PARK = "park"
    """The job must wait (a pause, its ``not_before``): claimed, to be parked (``parking.park``)."""
    PARKED = "parked"
    """The job must wait and was parked here with the message the caller gave."""


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    attempts: int
    status: Status | None = None
    remaining_ms: int = 0
    """For ``BUSY``: how long the other holder's claim still runs."""
    takeovers: int = 0
    reason: Reason | None = None
    """For ``PARK``: why the job waits."""
    detail: str | None = None
    wait_ms: int | None = None
    """For ``PARK``: how long (``None``: until released)."""
    suppressed: bool = False
    """For ``CLAIMED``/``TAKEN_OVER``: a customer-facing address is on the suppression list."""


def _call(
    conn: Connection | LedgerBatcher, function: str, fields: dict[str, Any], message: bytes | None
) -> Any:
    """``function(fields, message)``'s answer, committed: on ``conn`` alone, or in a batch."""
    encoded = json.dumps(fields)
    if isinstance(conn, LedgerBatcher):
        return conn.call(function, str(fields["job_id"]), encoded, message)
    with translated_errors():
        return call_alone(conn, function, encoded, message)


def claim_job(
    conn: Connection | LedgerBatcher,
    job: Job,
    payload_sha256: str,
    *,
    holder: str,
    claim_ms: int,
    crash_loop_after: int = 3,
    published_ms: int | None = None,
    parking: tuple[str, bytes] | None = None,
    series_wait_ms: int | None = None,
    customers: Sequence[str] = (),
) -> ClaimResult:
    """Claim ``job`` for ``holder`` for ``claim_ms``, counting the attempt (see the stale-claim
    rule), unless a directive, the job's expiry or its schedule decides otherwise: a matching
    cancel or a passed ``expires_at`` ends the job here; a pause or a ``not_before`` ahead
    answers ``PARK``. ``published_ms`` is when the job was published (the message timestamp),
    which a cancel's ``--published-before`` compares.

    ``parking`` (queue, encoded message) lets a job that must wait be parked in the same
    statement (``PARKED``); with ``series_wait_ms`` too, a job nothing else stops is parked for
    its series slot that far away. ``customers``: the customer-facing addresses, looked up in
    the tenant's suppression list (``suppressed``).
    """
    fields = {
        "job_id": str(job.job_id),
        "tenant": job.tenant,
        "doc_type": job.document.type.value,
        "doc_number": job.document.number,
        "sha256": payload_sha256,
        "holder": holder,
        "claim_ms": claim_ms,
        "crash_loop_after": crash_loop_after,
        "published_ms": published_ms,
        "not_before": job.not_before.isoformat() if job.not_before else None,
        "expires_at": job.expires_at.isoformat() if job.expires_at else None,
        "queue": parking[0] if parking else None,
        "series_wait_ms": series_wait_ms if parking else None,
        "customers": [address.lower() for address in customers],
    }
    # Claim, directives, expiry and schedule in one statement (deploy/migrations/0013).
    answer: dict[str, Any] = _call(conn, "postbote_claim", fields, parking[1] if parking else None)
    status = answer.get("status")
    reason = answer.get("reason")
    return ClaimResult(
        Claim(answer["claim"]),
        int(answer.get("attempts") or 0),
        Status(status) if status else None,
        remaining_ms=int(answer.get("remaining_ms") or 0),
        takeovers=int(answer.get("takeovers") or 0),
        reason=Reason(reason) if reason else None,
        detail=answer.get("detail"),
        wait_ms=int(answer["wait_ms"]) if answer.get("wait_ms") is not None else None,
        suppressed=bool(answer.get("suppressed")),
    )


@dataclass(frozen=True)
class Progress:
    """What earlier attempts of a job left: its recipients' fates and, while some have the mail
    and others wait, the signed bytes they got."""

    fates: tuple[Fate, ...]
    sender: str | None
    message_id: str | None
    message: bytes | None


def load_progress(conn: Connection, job_id: UUID) -> Progress:
    """The recipients' fates of a job seen before (none for a job never attempted)."""
    with translated_errors():
        job = conn.execute(
            "SELECT sender, message_id, message FROM deliveries WHERE job_id = %s", (job_id,)
        ).fetchone()
        rows = conn.execute(
            "SELECT address, role, state, reply_code, reply_enhanced, reply_text, attempts"
            " FROM delivery_recipients WHERE job_id = %s ORDER BY position",
            (job_id,),
        ).fetchall()
    fates = tuple(_fate(row) for row in rows)
    if job is None:
        return Progress(fates, None, None, None)
    message = job["message"]
    return Progress(fates, job["sender"], job["message_id"], bytes(message) if message is not None else None)


_EMIT = "SELECT postbote_emit_event(%s, %s)"
"""The event of the job's state as this transaction leaves it (deploy/migrations/0007_events.sql)."""


def record_attempt(conn: Connection | LedgerBatcher, record: AttemptRecord) -> Status:
    """Record one SMTP attempt in one statement: the job's status, each recipient's state and
    reply, and the attempt's row in the history. Returns the job's status.

    Only the worker holding the job's claim records (``record.worker``): an attempt whose
    claim was taken over meanwhile, or an outcome recorded already, changes nothing.

    Raises:
      ClaimedElsewhere: the claim is not ``record.worker``'s (any more).
    """
    verdict = record.verdict
    fates = [
        {**f.to_json(), "text": _storable(f.reply.text if f.reply else None), "position": n}
        for n, f in enumerate(verdict.fates)
    ]
    by_address = {f.address: f for f in verdict.fates}
    tried = [
        {"address": a, "role": by_address[a].role.value, "reply": _storable(_reply_text(by_address[a].reply))}
        for a in record.tried
        if a in by_address
    ]
    fields = {
        "job_id": str(record.job_id),
        "status": verdict.status.value,
        "delivered": [status.value for status in DELIVERED],
        "reason": verdict.reason.value if verdict.reason else None,
        "detail": _storable(verdict.detail),
        "smtp_reply": _storable(verdict.smtp_reply),
        "sender": record.sender,
        "message_id": record.message_id,
        "next_attempt_ms": record.next_attempt_ms,
        "fates": fates,
        "event_recipients": [
            {"address": f["address"], "role": f["role"], "state": f["state"], "reply": event_reply(f)}
            for f in fates
        ],
        "attempt": record.attempt,
        "started_at": record.started_at,
        "duration_ms": record.duration_ms,
        "worker": record.worker,
        "reply": _storable(record.reply),
        "tried": tried,
    }
    # The job's status, the recipients, the attempt and its event (deploy/migrations/0015).
    if not _call(conn, "postbote_record_attempt", fields, record.message):
        raise _not_recorded(record)
    return verdict.status


def _not_recorded(record: AttemptRecord) -> ClaimedElsewhere:
    return ClaimedElsewhere(
        f"job {record.job_id} is no longer claimed by {record.worker}: this attempt's outcome"
        " is not recorded (another worker took the job over, or it was recorded already)",
        retry_in_ms=0,
    )


def record_failure(
    conn: Connection,
    job_id: UUID,
    *,
    final: bool,
    reason: Reason,
    detail: str,
    smtp_reply: str | None = None,
    sender: str | None = None,
    recipients: Sequence[Recipient] = (),
    next_attempt_ms: int | None = None,
) -> None:
    """Mark the job ``failed`` (final) or ``retrying`` with the reason and the server's reply;
    ``recipients`` the mail would have had are recorded ``pending`` where the ledger has none."""
    detail, smtp_reply = storable(detail), _storable(smtp_reply)
    status = Status.FAILED if final else Status.RETRYING
    with translated_errors(), conn.transaction():
        changed = conn.execute(
            "UPDATE deliveries SET status = %s, reason = %s, detail = %s,"
            " smtp_reply = COALESCE(%s, smtp_reply), sender = COALESCE(%s, sender),"
            " next_attempt_at = clock_timestamp() + %s::bigint * interval '1 ms',"
            " claimed_by = NULL, claimed_until = NULL,"
            " updated_at = clock_timestamp() WHERE job_id = %s AND status <> ALL(%s)",
            (status, reason, detail, smtp_reply, sender, next_attempt_ms, job_id, list(DELIVERED)),
        ).rowcount
        if recipients:
            conn.execute(
                "INSERT INTO delivery_recipients (job_id, address, position, role, state)"
                " SELECT %s, r.address, r.position, r.role, %s"
                " FROM jsonb_to_recordset(%s::jsonb) AS r (address text, position smallint, role text)"
                " ON CONFLICT (job_id, address) DO NOTHING",
                (
                    job_id,
                    RecipientState.PENDING,
                    json.dumps(
                        [
                            {"address": r.address, "role": r.role.value, "position": n}
                            for n, r in enumerate(recipients)
                        ]
                    ),
                ),
            )
        if changed:
            conn.execute(_EMIT, (job_id, EventType(status)))


def record_given_up(
    conn: Connection, job: Job, payload_sha256: str, *, reason: Reason, detail: str, smtp_reply: str | None
) -> Verdict | None:
    """End a job whose retries ran out, creating the row if no attempt got as far as a claim.

    Recipients still waiting count as refused: a job some customer-facing recipient got
    ends ``partial`` (or ``sent``, when only an internal copy was waiting), any other
    ``failed`` with ``reason``. ``None`` when the job had already ended sent or partial.
    """
    detail, smtp_reply = storable(detail), _storable(smtp_reply)
    with translated_errors(), conn.transaction():
        inserted = conn.execute(
            """
            INSERT INTO deliveries (job_id, tenant_id, doc_type, doc_number, payload_sha256, status,
                                    reason, detail, smtp_reply)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (job_id) DO NOTHING
            RETURNING job_id
            """,
            (
                job.job_id,
                job.tenant,
                job.document.type.value,
                job.document.number,
                payload_sha256,
                Status.FAILED,
                reason,
                detail,
                smtp_reply,
            ),
        ).fetchone()
        if inserted is not None:
            conn.execute(_EMIT, (job.job_id, EventType.FAILED))
            return Verdict(Status.FAILED, (), reason, detail, smtp_reply)
        row = conn.execute(
            "SELECT status FROM deliveries WHERE job_id = %s FOR UPDATE", (job.job_id,)
        ).fetchone()
        assert row is not None
        if Status(row["status"]).delivered:
            return None
        progress = load_progress(conn, job.job_id)
        verdict = out_of_attempts(progress.fates, detail)
        if verdict.status is Status.FAILED:
            verdict = replace(
                verdict, reason=reason, detail=detail, smtp_reply=smtp_reply or verdict.smtp_reply
            )
        else:
            verdict = replace(verdict, detail="; ".join(p for p in (verdict.detail, detail) if p))
        conn.execute(
            "UPDATE deliveries SET status = %s, reason = %s, detail = %s,"
            " smtp_reply = COALESCE(%s, smtp_reply), message = NULL, next_attempt_at = NULL,"
            " claimed_by = NULL, claimed_until = NULL, updated_at = clock_timestamp(),"
            " sent_at = CASE WHEN %s THEN clock_timestamp() ELSE sent_at END"
            " WHERE job_id = %s",
            (
                verdict.status,
                verdict.reason,
                verdict.detail,
                verdict.smtp_reply,
                verdict.status.delivered,
                job.job_id,
            ),
        )
        for fate in verdict.settled:
            conn.execute(
                "UPDATE delivery_recipients SET state = %s, reply_code = %s, reply_enhanced = %s, reply_text = %s,"
                " updated_at = clock_timestamp() WHERE job_id = %s AND address = %s",
                (
                    fate.state,
                    fate.reply.code if fate.reply else None,
                    fate.reply.enhanced if fate.reply else None,
                    _storable(fate.reply.text) if fate.reply else None,
                    job.job_id,
                    fate.address,
                ),
            )
        conn.execute(_EMIT, (job.job_id, EventType(verdict.status)))
    return verdict


def renew_claim(conn: Connection, job_id: UUID, *, holder: str, claim_ms: int) -> bool:
    """Extend ``holder``'s claim by ``claim_ms`` from now; False when it is no longer ours."""
    with translated_errors():
        row = conn.execute(
            "UPDATE deliveries SET claimed_until = clock_timestamp() + %s * interval '1 ms'"
            " WHERE job_id = %s AND claimed_by = %s AND status = %s RETURNING job_id",
            (claim_ms, job_id, holder, Status.SENDING),
        ).fetchone()
        conn.commit()
    return row is not None


SESSION_NAME_MAX = 63
"""PostgreSQL keeps that many bytes of an ``application_name`` (``NAMEDATALEN - 1``)."""


def session_name(holder: str) -> str:
    """The ``application_name`` of the database sessions that write ``holder``'s claims: its
    end (the unique part) if the whole is longer than PostgreSQL keeps."""
    return f"postbote {holder}"[-SESSION_NAME_MAX:]


def release_claims(conn: Connection, holder: str, *, wait_s: float = 10.0) -> int:
    """Expire every claim of ``holder`` (a worker process known to be dead); returns how many.

    A statement the process sent before it died may still run in its session and commit claims
    after they were released: its sessions (named with :func:`session_name`) are ended first,
    and the release waits up to ``wait_s`` for them to be gone.
    """
    name = session_name(holder)
    with translated_errors():
        conn.execute(
            "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity"
            " WHERE application_name = %s AND usename = current_user AND pid <> pg_backend_pid()",
            (int(wait_s * 1000), name),
        )
        cursor = conn.execute(
            "UPDATE deliveries SET claimed_until = clock_timestamp() - interval '1 ms'"
            " WHERE claimed_by = %s AND status = %s",
            (holder, Status.SENDING),
        )
        conn.commit()
    return cursor.rowcount


def reopen_failed(conn: Connection, job_id: UUID) -> Status | None:
    """Let a ``failed`` job be sent once more (replay): it becomes ``retrying`` with its
    crash counter reset and its refused recipients ``pending`` again. Returns the status the job had (``None`` without a ledger row);
    any other status is left alone, so the ledger still refuses a second send.

    Runs in the caller's transaction.
    """
    with translated_errors():
        row = conn.execute("SELECT status FROM deliveries WHERE job_id = %s FOR UPDATE", (job_id,)).fetchone()
        if row is None:
            return None
        status = Status(row["status"])
        if status is Status.FAILED:
            conn.execute(
                "UPDATE deliveries SET status = %s, reason = %s, takeovers = 0, message = NULL,"
                " next_attempt_at = NULL, claimed_by = NULL, claimed_until = NULL, updated_at = clock_timestamp()"
                " WHERE job_id = %s",
                (Status.RETRYING, Reason.REPLAYED, job_id),
            )
            conn.execute(
                "UPDATE delivery_recipients SET state = %s, updated_at = clock_timestamp()"
                " WHERE job_id = %s AND state = %s",
                (RecipientState.PENDING, job_id, RecipientState.REFUSED),
            )
            conn.execute(_EMIT, (job_id, EventType.REPLAYED))
    return status


_RECORD_COLUMNS = (
    "job_id, tenant_id AS tenant, doc_type, doc_number, status, reason, detail, attempts, takeovers, sender,"
    " message_id, smtp_reply, next_attempt_at, created_at, updated_at, sent_at"
)


def delivery_record(conn: Connection, job_id: UUID) -> dict[str, Any] | None:
    """The ledger's record of a job as shown by ``postbote status``: its recipients with role,
    state and reply, and the history of its attempts."""
    with translated_errors():
        row = conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM deliveries WHERE job_id = %s", (job_id,)
        ).fetchone()
        return _with_recipients(conn, row) if row is not None else None


def document_records(
    conn: Connection, doc_type: str, doc_number: str, *, tenant: str | None = None
) -> list[dict[str, Any]]:
    """The records of every job for one business document, newest first."""
    with translated_errors():
        rows = conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM deliveries WHERE doc_number = %s AND doc_type = %s"
            " AND (%s::text IS NULL OR tenant_id = %s) ORDER BY created_at DESC, job_id",
            (doc_number, doc_type, tenant, tenant),
        ).fetchall()
        return [_with_recipients(conn, row) for row in rows]


def _with_recipients(conn: Connection, row: dict[str, Any]) -> dict[str, Any]:
    job_id = row["job_id"]
    recipients = conn.execute(
        "SELECT address, role, state, reply_code, reply_enhanced, reply_text, attempts, updated_at"
        " FROM delivery_recipients WHERE job_id = %s ORDER BY position",
        (job_id,),
    ).fetchall()
    history = conn.execute(
        "SELECT attempt, started_at, duration_ms, worker, outcome, reply, recipients"
        " FROM delivery_attempts WHERE job_id = %s ORDER BY attempt",
        (job_id,),
    ).fetchall()
    return {
        **row,
        "recipients": [
            {
                "address": r["address"],
                "role": r["role"],
                "state": r["state"],
                "reply": _reply_text(_fate(r).reply),
                "attempts": r["attempts"],
                "updated_at": r["updated_at"],
            }
            for r in recipients
        ],
        "history": [dict(h) for h in history],
    }


def _fate(row: dict[str, Any]) -> Fate:
    return Fate.from_json(
        {**row, "code": row["reply_code"], "enhanced": row["reply_enhanced"], "text": row["reply_text"]}
    )


def _storable(text: str | None) -> str | None:
    """Text from outside (an SMTP reply, an error) as PostgreSQL stores it: a NUL in a server's
    reply must not keep an outcome from being recorded."""
    return storable(text) if text is not None else None


def event_reply(fate: dict[str, Any]) -> str | None:
    """A stored fate's reply as an event lists it, as ``postbote_event_recipients`` reads it back
    (deploy/migrations/0015_lighter_writes.sql)."""
    parts = (str(fate["code"]) if fate["code"] else None, fate["enhanced"], fate["text"])
    return " ".join(p for p in parts if p is not None) or None


def _reply_text(reply: SmtpReply | None) -> str | None:
    return str(reply) if reply is not None else None


__all__ = [
    "Claim",
    "ClaimResult",
    "Progress",
    "claim_job",
    "delivery_record",
    "document_records",
    "event_reply",
    "load_progress",
    "record_attempt",
    "record_failure",
    "record_given_up",
    "release_claims",
    "renew_claim",
    "reopen_failed",
    "session_name",
]
