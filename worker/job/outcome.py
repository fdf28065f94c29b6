"""What an SMTP attempt makes of a job: each recipient's state, and the job's status from them.

The job's status is decided by its customer-facing recipients only:

- ``sent``: every one accepted;
- ``partial``: at least one accepted, the rest refused permanently or out of attempts;
- ``failed``: none accepted (reason ``recipients_refused``, or the error that ended
  the attempt, such as a refused MAIL FROM);
- ``retrying``: a customer-facing recipient was refused temporarily (4xx) or not
  answered; only the recipients still ``pending`` are tried again. Internal copies
  (clerk, archive) refused temporarily are retried too once a customer has the mail.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from worker.errors import PermanentError, RecipientsRefused, TransientError
from worker.job.smtp import Delivery, SmtpReply
from worker.vocabulary import Reason, RecipientState, Role, Status


@dataclass(frozen=True)
class Fate:
    """One envelope recipient and what became of it so far."""

    address: str
    role: Role
    state: RecipientState = RecipientState.PENDING
    reply: SmtpReply | None = None
    attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        reply = self.reply
        return {
            "address": self.address,
            "role": self.role.value,
            "state": self.state.value,
            "code": reply.code if reply else None,
            "enhanced": reply.enhanced if reply else None,
            "text": reply.text if reply else None,
            "attempts": self.attempts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fate:
        """A fate from :meth:`to_json`, or from a ``delivery_recipients`` row read as JSON."""
        reply = None
        if data["text"] is not None:
            reply = SmtpReply(int(data["code"] or 0), data["enhanced"], str(data["text"]))
        return cls(
            str(data["address"]),
            Role(data["role"]),
            RecipientState(data["state"]),
            reply,
            int(data["attempts"]),
        )


@dataclass(frozen=True)
class Verdict:
    status: Status
    fates: tuple[Fate, ...]
    reason: Reason | None = None
    detail: str | None = None
    smtp_reply: str | None = None
    settled: tuple[Fate, ...] = ()
    """The recipients that reached ``accepted`` or ``refused`` in this step."""

    @property
    def reached(self) -> bool:
        """Whether a customer-facing recipient has the mail."""
        return any(f.role.customer_facing and f.state is RecipientState.ACCEPTED for f in self.fates)


def settle(fates: Sequence[Fate], delivery: Delivery) -> Verdict:
    """Apply one attempt's replies to the recipients it carried (those ``pending``) and judge the job."""
    error = delivery.error
    permanent = isinstance(error, PermanentError)
    after = []
    for fate in fates:
        if fate.state is not RecipientState.PENDING:
            after.append(fate)
            continue
        tried = replace(fate, attempts=fate.attempts + 1)
        refusal = delivery.refused.get(fate.address)
        if fate.address in delivery.accepted:
            after.append(replace(tried, state=RecipientState.ACCEPTED, reply=delivery.reply))
        elif refusal is not None:
            after.append(
                replace(
                    tried,
                    state=RecipientState.REFUSED if refusal.code >= 500 else RecipientState.PENDING,
                    reply=refusal,
                )
            )
        elif error is not None:
            after.append(
                replace(
                    tried,
                    state=RecipientState.REFUSED if permanent else RecipientState.PENDING,
                    reply=reply_of(error),
                )
            )
        else:
            after.append(tried)
    return judge(fates, after, error)


def out_of_attempts(fates: Sequence[Fate], error: str | None = None) -> Verdict:
    """The job when no attempt is left: a recipient still waiting counts as refused. Internal
    copies of a mail no customer got stay ``pending``: they were never due."""
    fallback = SmtpReply(0, None, error) if error else None
    reached = any(f.role.customer_facing and f.state is RecipientState.ACCEPTED for f in fates)
    after = [
        replace(f, state=RecipientState.REFUSED, reply=f.reply or fallback)
        if f.state is RecipientState.PENDING and (reached or f.role.customer_facing)
        else f
        for f in fates
    ]
    return judge(fates, after, None)


def judge(
    before: Sequence[Fate], after: Sequence[Fate], error: TransientError | PermanentError | None
) -> Verdict:
    """The job's status from its recipients' states (see the module docstring)."""
    customers = [f for f in after if f.role.customer_facing]
    reached = any(f.state is RecipientState.ACCEPTED for f in customers)
    waiting = [f for f in after if f.state is RecipientState.PENDING and (reached or f.role.customer_facing)]
    settled = tuple(a for b, a in zip(before, after, strict=True) if a.state is not b.state)
    fates = tuple(after)
    if waiting:
        return Verdict(
            Status.RETRYING,
            fates,
            reason=error.reason if error is not None else Reason.SMTP_TEMPORARY,
            detail="waiting for " + _listing(waiting) + (f"; {error}" if error is not None else ""),
            smtp_reply=_worst(waiting),
            settled=settled,
        )
    # A bounce report may have come in for a recipient while others still waited.
    refused = [f for f in customers if f.state in (RecipientState.REFUSED, RecipientState.BOUNCED)]
    if not reached:
        if isinstance(error, PermanentError) and not isinstance(error, RecipientsRefused):
            reason, detail = error.reason, str(error)
        else:
            reason, detail = (
                Reason.RECIPIENTS_REFUSED,
                "no customer-facing recipient accepted: " + _listing(refused),
            )
        return Verdict(Status.FAILED, fates, reason, detail, _worst(refused), settled)
    accepted_reply = next((f.reply for f in customers if f.state is RecipientState.ACCEPTED), None)
    if refused:
        return Verdict(
            Status.PARTIAL,
            fates,
            Reason.RECIPIENTS_REFUSED,
            "refused: " + _listing(refused),
            str(accepted_reply) if accepted_reply else None,
            settled,
        )
    return Verdict(
        Status.SENT, fates, smtp_reply=str(accepted_reply) if accepted_reply else None, settled=settled
    )


def reply_of(error: TransientError | PermanentError) -> SmtpReply:
    """The server's reply an error carries, or the error itself as a reply without a code."""
    if error.smtp_reply:
        code, _, text = error.smtp_reply.partition(" ")
        if code.isdigit():
            return SmtpReply.parse(int(code), text)
    return SmtpReply(0, None, str(error))


def _listing(fates: Sequence[Fate]) -> str:
    return "; ".join(f"{f.address} ({f.reply})" if f.reply else f.address for f in fates)


def _worst(fates: Sequence[Fate]) -> str | None:
    replies = [f.reply for f in fates if f.reply is not None]
    return str(replies[0]) if replies else None


@dataclass(frozen=True)
class AttemptRecord:
    """Everything the ledger records of one SMTP attempt, in one transaction."""

    job_id: UUID
    attempt: int
    started_at: float
    """Wall-clock time (epoch seconds) the attempt began."""
    duration_ms: int
    worker: str
    tried: tuple[str, ...]
    """The recipients this attempt carried."""
    sender: str
    message_id: str
    reply: str | None
    """The last DATA reply, or the error that ended the attempt."""
    verdict: Verdict
    message: bytes | None = None
    """The signed bytes while some recipients have the mail and others wait for a retry."""
    next_attempt_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form, to travel with a requeued message when the ledger is down."""
        v = self.verdict
        return {
            "job_id": str(self.job_id),
            "attempt": self.attempt,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
            "worker": self.worker,
            "tried": list(self.tried),
            "sender": self.sender,
            "message_id": self.message_id,
            "reply": self.reply,
            "message": base64.b64encode(self.message).decode() if self.message is not None else None,
            "next_attempt_ms": self.next_attempt_ms,
            "verdict": {
                "status": v.status.value,
                "reason": v.reason,
                "detail": v.detail,
                "smtp_reply": v.smtp_reply,
                "fates": [f.to_json() for f in v.fates],
                "settled": [f.to_json() for f in v.settled],
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttemptRecord:
        v = data["verdict"]
        verdict = Verdict(
            Status(v["status"]),
            tuple(Fate.from_json(f) for f in v["fates"]),
            Reason(v["reason"]) if v["reason"] else None,
            v["detail"],
            v["smtp_reply"],
            tuple(Fate.from_json(f) for f in v["settled"]),
        )
        message = data["message"]
        return cls(
            job_id=UUID(data["job_id"]),
            attempt=int(data["attempt"]),
            started_at=float(data["started_at"]),
            duration_ms=int(data["duration_ms"]),
            worker=str(data["worker"]),
            tried=tuple(data["tried"]),
            sender=str(data["sender"]),
            message_id=str(data["message_id"]),
            reply=data["reply"],
            verdict=verdict,
            message=base64.b64decode(message) if message is not None else None,
            next_attempt_ms=data["next_attempt_ms"],
        )


__all__ = [
    "AttemptRecord",
    "Fate",
    "Verdict",
    "judge",
    "out_of_attempts",
    "reply_of",
    "settle",
]
