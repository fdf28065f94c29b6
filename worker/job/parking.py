"""Parked jobs: a job that must wait lives in PostgreSQL, not unacknowledged in a consumer.

A paused tenant's job (``held``), a job whose ``not_before`` lies ahead (``scheduled``) and one
whose series slot is further away than a consumer should wait (``retrying``, reason ``series``)
are parked: the claim is given back without using an attempt, the message is stored with its
reason and due time in ``parked_jobs``, and only then is the RabbitMQ message acknowledged.
The releaser (``worker.runtime.releaser``) republishes a parked job when it is due; ``resume``
and ``suppression remove`` make held jobs due. A job released twice (a releaser that died
between publishing and recording it) is still sent once: the ledger's claim decides.

The last check before DATA (``before_data``) is where a cancel or a pause that came while the
job waited for its series slot still stops it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from uuid import UUID

from worker.db import Connection, translated_errors
from worker.vocabulary import Reason, Status


class Check(StrEnum):
    """What the last check before DATA decided (``postbote_before_data``)."""

    GO = "go"
    """Send now; from here a cancel is too late."""
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    PAUSED = "paused"
    """A pause came while the job waited: park it."""
    LOST = "lost"
    """The claim is not this holder's any more (taken over, or ended by a cancel)."""


def park(
    conn: Connection,
    job_id: UUID,
    *,
    holder: str,
    reason: Reason,
    status: Status,
    wait_ms: int | None,
    queue: str,
    message: bytes,
    detail: str | None = None,
) -> bool:
    """Park a job ``holder`` has claimed: its claim is given back without using an attempt and
    ``message`` (the encoded dramatiq message) is kept until due (``wait_ms``; ``None``: until
    released). An event is written when the job's waiting reason changed. False when the claim
    is no longer ``holder``'s (the job was taken over or ended meanwhile)."""
    fields = {
        "job_id": str(job_id),
        "holder": holder,
        "reason": reason.value,
        "status": status.value,
        "detail": detail,
        "wait_ms": wait_ms,
        "queue": queue,
    }
    with translated_errors():
        row = conn.execute(
            "SELECT postbote_park(%s::jsonb, %s) AS parked", (json.dumps(fields), message)
        ).fetchone()
    return bool(row and row["parked"])


def before_data(conn: Connection, job_id: UUID, *, holder: str) -> Check:
    """The last check before DATA, under the job's row lock (see ``Check``)."""
    with translated_errors():
        row = conn.execute("SELECT postbote_before_data(%s, %s) AS check", (job_id, holder)).fetchone()
    assert row is not None
    return Check(row["check"])


@dataclass(frozen=True)
class DueJob:
    job_id: UUID
    tenant: str
    reason: Reason
    queue: str
    message: bytes


def take_due(conn: Connection, queues: Sequence[str], *, lead_ms: int, limit: int) -> list[DueJob]:
    """Mark parked jobs of ``queues`` due within ``lead_ms`` as released and return them, oldest
    publication first; the caller publishes them after this transaction commits. A tenant's series-parked
    jobs are released at most one series (``batch_size``) at a time, and not before the slot the
    last of them to park was told (``series_parked``). A job released long ago and
    still not claimed (its message lost with a releaser that died before publishing) is released
    again."""
    with translated_errors():
        rows = conn.execute(
            """
            WITH due AS (
                SELECT p.job_id, p.reason, p.tenant_id,
                       row_number() OVER (PARTITION BY p.tenant_id, p.reason = 'series'
                                          ORDER BY p.published_at NULLS LAST, p.position) AS n,
                       coalesce(t.batch_size, 1) AS batch_size, p.published_at, p.position
                FROM parked_jobs p LEFT JOIN tenants t ON t.id = p.tenant_id
                LEFT JOIN series_parked s ON s.tenant_id = p.tenant_id AND p.reason = 'series'
                WHERE p.queue = ANY(%s)
                  AND ((p.released_at IS NULL
                        AND greatest(p.due_at, s.until) <= clock_timestamp() + %s * interval '1 ms')
                       OR p.released_at < clock_timestamp() - interval '10 minutes')
            )
            SELECT job_id FROM due WHERE reason <> 'series' OR n <= batch_size
            ORDER BY published_at NULLS LAST, position
            LIMIT %s
            """,
            (list(queues), lead_ms, limit),
        ).fetchall()
        if not rows:
            return []
        released = conn.execute(
            "UPDATE parked_jobs SET released_at = clock_timestamp() WHERE job_id = ANY(%s)"
            " AND (released_at IS NULL OR released_at < clock_timestamp() - interval '10 minutes')"
            " AND job_id IN (SELECT job_id FROM parked_jobs WHERE job_id = ANY(%s) FOR UPDATE SKIP LOCKED)"
            " RETURNING job_id, tenant_id, reason, queue, message, published_at, position",
            ([r["job_id"] for r in rows], [r["job_id"] for r in rows]),
        ).fetchall()
        for row in released:
            if row["reason"] != Reason.SERIES:
                conn.execute("SELECT postbote_emit_event(%s, 'released')", (row["job_id"],))
    released.sort(key=lambda r: (r["published_at"] is None, r["published_at"], r["position"]))
    return [
        DueJob(r["job_id"], r["tenant_id"], Reason(r["reason"]), r["queue"], bytes(r["message"]))
        for r in released
    ]


def unrelease(conn: Connection, job_ids: Sequence[UUID]) -> None:
    """Jobs marked released but not published (RabbitMQ went away): due again at once."""
    with translated_errors():
        conn.execute("UPDATE parked_jobs SET released_at = NULL WHERE job_id = ANY(%s)", (list(job_ids),))


def expire_parked(conn: Connection) -> int:
    """End every parked job whose ``expires_at`` has passed (``expired``, with its event)."""
    with translated_errors():
        rows = conn.execute(
            "SELECT p.job_id FROM parked_jobs p JOIN deliveries d USING (job_id)"
            " WHERE d.expires_at <= clock_timestamp() AND d.status IN ('held', 'scheduled', 'retrying')"
            " FOR UPDATE OF d SKIP LOCKED"
        ).fetchall()
        for row in rows:
            conn.execute(
                "SELECT postbote_end_unsent(%s, 'expired', 'not sent by its expires_at', NULL)",
                (row["job_id"],),
            )
    return len(rows)


def release_parked(
    conn: Connection,
    *,
    tenant: str,
    reason: Reason | None = None,
    doc_types: Sequence[str] | None = None,
    job_ids: Sequence[UUID] | None = None,
) -> int:
    """Make held jobs (of ``reason``, or any but series waits) due now, so the releaser
    republishes them in their original order; returns how many. Paused jobs a pause still covers
    stay parked. Runs in the caller's transaction."""
    with translated_errors():
        cursor = conn.execute(
            "UPDATE parked_jobs p SET due_at = clock_timestamp(), released_at = NULL"
            " WHERE p.tenant_id = %s AND p.released_at IS NULL"
            " AND (p.due_at IS NULL OR p.due_at > clock_timestamp()) AND p.reason <> 'series'"
            " AND (%s::text IS NULL OR p.reason = %s)"
            " AND (%s::text[] IS NULL OR p.doc_type = ANY(%s))"
            " AND (%s::uuid[] IS NULL OR p.job_id = ANY(%s))"
            " AND (p.reason <> 'paused' OR (postbote_directive_for(p.job_id, p.tenant_id, p.doc_type,"
            "      p.published_at)).kind IS DISTINCT FROM 'pause')",
            (
                tenant,
                reason,
                reason,
                list(doc_types) if doc_types is not None else None,
                list(doc_types) if doc_types is not None else None,
                list(job_ids) if job_ids is not None else None,
                list(job_ids) if job_ids is not None else None,
            ),
        )
    return cursor.rowcount


def waiting_jobs(
    conn: Connection,
    *,
    tenant: str | None = None,
    status: str | None = None,
    doc_type: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Jobs not ended: sending, retrying, held or scheduled, with why and until when."""
    with translated_errors():
        return conn.execute(
            "SELECT d.job_id, d.tenant_id AS tenant, d.doc_type, d.doc_number, d.status, d.reason, d.detail,"
            " d.attempts, d.next_attempt_at, d.not_before, d.expires_at, d.published_at, d.updated_at,"
            " p.due_at AS parked_until, p.released_at"
            " FROM deliveries d LEFT JOIN parked_jobs p USING (job_id)"
            " WHERE d.status IN ('sending', 'retrying', 'held', 'scheduled')"
            " AND (%s::text IS NULL OR d.tenant_id = %s) AND (%s::text IS NULL OR d.status = %s)"
            " AND (%s::text IS NULL OR d.doc_type = %s)"
            " ORDER BY d.tenant_id, d.published_at NULLS LAST, d.created_at LIMIT %s",
            (tenant, tenant, status, status, doc_type, doc_type, limit),
        ).fetchall()


def parked_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """``(tenant, reason, jobs)`` of every parked job not yet released (the gauge)."""
    with translated_errors():
        rows = conn.execute(
            "SELECT tenant_id, reason, count(*) AS jobs FROM parked_jobs WHERE released_at IS NULL"
            " GROUP BY tenant_id, reason"
        ).fetchall()
    return [(r["tenant_id"], r["reason"], int(r["jobs"])) for r in rows]


__all__ = [
    "Check",
    "DueJob",
    "before_data",
    "expire_parked",
    "park",
    "parked_counts",
    "release_parked",
    "take_due",
    "unrelease",
    "waiting_jobs",
]
