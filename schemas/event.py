"""The delivery event postbote publishes to ``<prefix>.events``: one per change of a job's state.

Consumers dedupe by ``event_id`` (a delivery may repeat) and order a job's events by ``seq``
(1, 2, 3 … without gaps). New fields may be added; none is renamed or removed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.job import Document


class EventType(StrEnum):
    """What happened to the job."""

    RETRYING = "retrying"
    SENT = "sent"
    PARTIAL = "partial"
    FAILED = "failed"
    DEAD = "dead"
    REPLAYED = "replayed"
    HELD = "held"
    RELEASED = "released"
    SCHEDULED = "scheduled"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    BOUNCED = "bounced"
    DELAYED = "delayed"
    SUPPRESSED = "suppressed"


JOB_ENDING_TYPES = frozenset(
    {EventType.SENT, EventType.PARTIAL, EventType.FAILED, EventType.CANCELLED, EventType.EXPIRED}
)
"""The types after which a job has nothing more to do (a later ``bounced`` may still follow)."""


class JobStatus(StrEnum):
    """A job's status in the delivery ledger after the event."""

    SENDING = "sending"
    RETRYING = "retrying"
    SENT = "sent"
    PARTIAL = "partial"
    FAILED = "failed"
    HELD = "held"
    SCHEDULED = "scheduled"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class RecipientRole(StrEnum):
    """Why an address is in the envelope: the job's own (``to``, ``cc``, ``bcc``), the clerk's
    copy (``clerk``) or the archive copy (``archive``)."""

    TO = "to"
    CC = "cc"
    BCC = "bcc"
    CLERK = "clerk"
    ARCHIVE = "archive"


class RecipientState(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    BOUNCED = "bounced"
    SUPPRESSED = "suppressed"


class _Model(BaseModel):
    # Consumers should accept fields added later: unknown fields are ignored, not refused.
    model_config = ConfigDict(extra="ignore", frozen=True)


class EventRecipient(_Model):
    """One envelope recipient as the ledger holds it after the event."""

    address: str
    role: RecipientRole
    state: RecipientState
    reply: str | None = Field(None, description="The SMTP server's last reply for this recipient.")


class Event(_Model):
    """One delivery event: the job's state as the ledger holds it right after the change."""

    event_id: UUID = Field(description="Unique per event; a repeated delivery carries the same one.")
    seq: Annotated[int, Field(ge=1, description="Per job: 1, 2, 3 … without gaps, in order of change.")]
    type: EventType
    occurred_at: AwareDatetime = Field(description="When the ledger changed (database clock).")
    job_id: UUID
    tenant: str
    document: Document
    status: JobStatus = Field(description="The job's status after the event.")
    reason: str | None = Field(None, description="Machine-readable reason of a failure or wait.")
    message_id: str | None = Field(None, description="The mail's Message-ID, once composed.")
    smtp_reply: str | None = Field(None, description="The SMTP server's last reply to the job.")
    attempt: Annotated[int, Field(ge=0, description="SMTP attempts made so far.")] = 0
    next_attempt_at: AwareDatetime | None = Field(None, description="When a retrying job is tried next.")
    recipients: list[EventRecipient] = []


__all__ = [
    "JOB_ENDING_TYPES",
    "Event",
    "EventRecipient",
    "EventType",
    "JobStatus",
    "RecipientRole",
    "RecipientState",
]
