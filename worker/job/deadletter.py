"""The dead-letter store: dead jobs with their final reason, kept in PostgreSQL until purged."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import dramatiq
from dramatiq.common import q_name

from schemas.job import Job
from worker.db import Connection, translated_errors
from worker.vocabulary import Reason


@dataclass(frozen=True)
class DeadJob:
    id: str
    queue_name: str
    reason: str
    """A :class:`Reason` (or one an earlier version stored)."""
    detail: str
    attempts: int
    job_id: UUID | None = None
    tenant: str | None = None
    doc_type: str | None = None
    doc_number: str | None = None
    smtp_reply: str | None = None
    message: dict[str, Any] | None = None
    """The broker message as it was first published, for replay."""
    raw_body: bytes | None = None
    """The undecodable body, when the message was not even JSON."""
    dead_at: datetime | None = None
    """When it was stored (``None`` before it is)."""

    @property
    def document(self) -> str:
        return " ".join(p for p in (self.doc_type, self.doc_number) if p) or "-"

    def summary(self) -> dict[str, Any]:
        """The fields ``dlq list`` shows."""
        return {
            "id": self.id,
            "job_id": str(self.job_id) if self.job_id else None,
            "tenant": self.tenant,
            "document": self.document,
            "reason": self.reason,
            "attempts": self.attempts,
            "dead_at": self.dead_at.isoformat() if self.dead_at else None,
        }


def dead_job(
    message: dramatiq.MessageProxy | dramatiq.Message[Any] | None,
    *,
    reason: Reason,
    detail: str,
    attempts: int,
    job: Job | None = None,
    job_id: UUID | None = None,
    tenant: str | None = None,
    smtp_reply: str | None = None,
    keyed_by_message: bool = False,
) -> DeadJob:
    """The dead-letter entry of a message, with what is known of its job (the whole job, or
    only the id and tenant of one that did not validate).

    The entry is keyed by the job id when there is one and not ``keyed_by_message``,
    otherwise by the message id (a fresh id without a message).
    """
    if job is not None:
        job_id, tenant = job.job_id, job.tenant
    if job_id is not None and not keyed_by_message:
        entry_id = str(job_id)
    else:
        entry_id = message.message_id if message else str(uuid.uuid4())
    return DeadJob(
        id=entry_id,
        queue_name=q_name(message.queue_name) if message else "",
        reason=reason,
        detail=detail,
        attempts=attempts,
        job_id=job_id,
        tenant=tenant,
        doc_type=job.document.type.value if job else None,
        doc_number=job.document.number if job else None,
        smtp_reply=smtp_reply,
        message=message.asdict() if message else None,
    )


def store_dead_job(conn: Connection, dead: DeadJob) -> None:
    """Record a dead job (idempotent: a second record of the same id replaces the first)."""
    with translated_errors():
        conn.execute(
            """
            INSERT INTO dead_letters (id, job_id, tenant_id, doc_type, doc_number, reason, detail, attempts,
                                      smtp_reply, queue_name, message, raw_body)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (id) DO UPDATE SET reason = EXCLUDED.reason, detail = EXCLUDED.detail,
                attempts = EXCLUDED.attempts, smtp_reply = EXCLUDED.smtp_reply, dead_at = now()
            """,
            (
                dead.id,
                dead.job_id,
                dead.tenant,
                dead.doc_type,
                dead.doc_number,
                dead.reason,
                dead.detail,
                dead.attempts,
                dead.smtp_reply,
                dead.queue_name,
                json.dumps(dead.message) if dead.message is not None else None,
                dead.raw_body,
            ),
        )
        conn.commit()


__all__ = ["DeadJob", "dead_job", "store_dead_job"]
