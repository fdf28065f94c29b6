"""Wires the stages together: job → ledger claim → sender → message → signature → series slot → SMTP → ledger.

Only this module knows the order. Each stage takes and returns plain values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

import dramatiq
from dramatiq.middleware import CurrentMessage
from pydantic import ValidationError

from schemas.constants import RECEIPTS_QUEUE, actor_of, queue_name
from schemas.job import DocumentType, Job
from worker import metrics
from worker.compose import compose_message
from worker.db import make_pool
from worker.deadletter import DeadJob, store_dead_job
from worker.dkim import DkimSigner, load_signer, sign_message
from worker.errors import DatabaseUnavailable, InvalidJob, PermanentError, TransientError
from worker.ledger import Claim, claim_job, record_failure, record_sent, release_claim
from worker.logs import log_outcome
from worker.ratelimit import PostgresBackend, SeriesLimiter, Throttled
from worker.senders import copy_recipients, resolve_sender
from worker.settings import Settings
from worker.smtp import SmtpPool
from worker.tenants import Account, AccountCache

logger = logging.getLogger(__name__)


def payload_digest(data: dict[str, Any]) -> str:
    """Fingerprint of a job's content: the same job id with another payload is a conflict."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Pipeline:
    """The per-process resources of the stages and the order they run in."""

    settings: Settings
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        self.db = make_pool(self.settings.database_url, max_size=16)
        self.accounts = AccountCache(self.db.connection, ttl_ms=self.settings.settings_cache_ms)
        self.smtp = SmtpPool(
            timeout_ms=self.settings.smtp_timeout_ms,
            on_connect=lambda tenant: metrics.SMTP_CONNECTIONS_OPENED.labels(tenant).inc(),
        )
        self._signers: dict[str, tuple[object, DkimSigner]] = {}
        self.limiter = SeriesLimiter(
            PostgresBackend(self.settings.database_url),
            holder_id=self.holder,
            lease_ms=self.settings.series_lease_ms,
        )
        self.brokers: dict[str, dramatiq.Broker] = {}

    def _signer(self, account: Account) -> DkimSigner:
        """The tenant's signer, rebuilt whenever the settings cache hands out a newly read account."""
        cached = self._signers.get(account.id)
        if cached is None or cached[0] is not account.dkim:
            assert account.dkim is not None
            cached = self._signers[account.id] = (account.dkim, load_signer(account.dkim))
        return cached[1]

    def close(self) -> None:
        self.limiter.close()
        self.limiter.backend.close()
        self.smtp.close()
        self.db.close()

    def process(self, data: dict[str, Any]) -> None:
        """Handle one job message; permanent failures are recorded and dead-lettered, transient ones raised."""
        started = time.monotonic()
        try:
            job = Job.model_validate(data, context={"max_job_bytes": self.settings.max_job_bytes})
        except ValidationError as e:
            self._dead_letter_invalid(data, InvalidJob(_validation_summary(e)))
            return
        try:
            self._send(job, data, started)
        except Throttled as e:
            with self.db.connection() as conn:
                release_claim(conn, job.job_id)
            self._defer(job, e.retry_in_ms, "deferred_series")
        except ClaimedElsewhere as e:
            self._defer(job, e.retry_in_ms, "deferred_claimed")
        except PermanentError as e:
            self._fail(job, e, started)
        except TransientError as e:
            self._retry_later(job, e, started)
            raise

    def _send(self, job: Job, data: dict[str, Any], started: float) -> None:
        claim_ms = self.settings.series_max_wait_ms + 4 * self.settings.smtp_timeout_ms
        with self.db.connection() as conn:
            claim = claim_job(conn, job, payload_digest(data), holder=self.holder, claim_ms=claim_ms)
        labels = (job.tenant, job.document.type.value)
        if claim.claim is Claim.DONE:
            metrics.DUPLICATES_PREVENTED.labels(job.tenant).inc()
            log_outcome(
                "duplicate_prevented",
                job_id=job.job_id,
                tenant=job.tenant,
                document=f"{job.document.type.value} {job.document.number}",
                status=claim.status,
            )
            return
        if claim.claim is Claim.CONFLICT:
            raise InvalidJob(
                f"job id {job.job_id} was already used for a different payload", reason="job_id_conflict"
            )
        if claim.claim is Claim.BUSY:
            raise TransientError(
                f"job {job.job_id} is being sent by another worker", reason="claimed_elsewhere"
            )
        if claim.claim is Claim.TAKEN_OVER:
            metrics.POSSIBLE_DUPLICATES.labels(job.tenant).inc()

        account = self.accounts.get(job.tenant)
        sender = resolve_sender(job, account)
        cc, blind = copy_recipients(job, account)
        message = compose_message(job, sender, cc, blind)
        if account.dkim is not None:
            signing_started = time.monotonic()
            message = replace(message, data=sign_message(message.data, self._signer(account)))
            metrics.DKIM_SIGN_SECONDS.observe(time.monotonic() - signing_started)
        with self.limiter.slot(
            account.id,
            batch_size=account.batch_size,
            pause_ms=account.pause_ms,
            priority=job.document.type is DocumentType.RECEIPT,
            max_wait_ms=self.settings.series_max_wait_ms,
        ) as slot:
            metrics.RATELIMIT_WAIT_SECONDS.labels(job.tenant).observe(slot.waited_ms / 1000)
            sent_at = time.monotonic()
            delivery = self.smtp.deliver(account.id, account.smtp, message)
            metrics.SMTP_SEND_SECONDS.labels(job.tenant).observe(time.monotonic() - sent_at)
        refused = {address: str(reply) for address, reply in delivery.refused.items()}
        status = self._record_sent_durably(
            job.job_id,
            sender=message.mail_from,
            recipients=list(message.recipients),
            message_id=message.message_id,
            smtp_reply=str(delivery.reply),
            refused=refused,
        )
        metrics.MAILS_SENT.labels(*labels).inc()
        log_outcome(
            status,
            job_id=job.job_id,
            tenant=job.tenant,
            document=f"{job.document.type.value} {job.document.number}",
            sender=message.mail_from,
            smtp_reply=str(delivery.reply),
            refused=",".join(refused) or None,
            duration_ms=round((time.monotonic() - started) * 1000),
        )

    def _defer(self, job: Job, delay_ms: int, outcome: str) -> None:
        """Waiting is not failing: hand the job back to the broker for later without using a retry."""
        message = CurrentMessage.get_current_message()
        assert message is not None
        self.brokers[message.queue_name].enqueue(message.copy(), delay=delay_ms)
        log_outcome(outcome, job_id=job.job_id, tenant=job.tenant, retry_in_ms=delay_ms)

    def _record_sent_durably(self, job_id: UUID, **outcome: Any) -> str:
        """After the server accepted the mail, the ledger write must not be lost to a database blip:
        retry it for as long as the claim protects the job, so an outage never causes a resend."""
        deadline = time.monotonic() + 2 * self.settings.smtp_timeout_ms / 1000
        delay = 0.2
        while True:
            try:
                with self.db.connection() as conn:
                    return record_sent(conn, job_id, **outcome)
            except DatabaseUnavailable:
                if time.monotonic() > deadline:
                    raise
                logger.warning("ledger write for sent job %s failed; retrying in %.1fs", job_id, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _fail(self, job: Job, error: PermanentError, started: float) -> None:
        message = CurrentMessage.get_current_message()
        with self.db.connection() as conn:
            if error.reason != "job_id_conflict":
                record_failure(
                    conn,
                    job.job_id,
                    final=True,
                    reason=error.reason,
                    detail=str(error),
                    smtp_reply=error.smtp_reply,
                )
            store_dead_job(
                conn,
                DeadJob(
                    id=str(job.job_id) if error.reason != "job_id_conflict" else _message_id(),
                    queue_name=message.queue_name if message else "",
                    reason=error.reason,
                    detail=str(error),
                    attempts=int(message.options.get("retries", 0)) + 1 if message else 1,
                    job_id=job.job_id,
                    tenant=job.tenant,
                    doc_type=job.document.type.value,
                    doc_number=job.document.number,
                    smtp_reply=error.smtp_reply,
                    message=message.asdict() if message else None,
                ),
            )
        metrics.MAILS_FAILED.labels(job.tenant, job.document.type.value, error.reason).inc()
        metrics.DEAD_LETTERED.labels(job.tenant, job.document.type.value, error.reason).inc()
        log_outcome(
            "failed",
            job_id=job.job_id,
            tenant=job.tenant,
            document=f"{job.document.type.value} {job.document.number}",
            reason=error.reason,
            detail=str(error),
            smtp_reply=error.smtp_reply,
            duration_ms=round((time.monotonic() - started) * 1000),
        )

    def _retry_later(self, job: Job, error: TransientError, started: float) -> None:
        metrics.RETRIES.labels(job.tenant, job.document.type.value, error.reason).inc()
        try:
            with self.db.connection() as conn:
                record_failure(
                    conn,
                    job.job_id,
                    final=False,
                    reason=error.reason,
                    detail=str(error),
                    smtp_reply=error.smtp_reply,
                )
        except DatabaseUnavailable:
            pass
        log_outcome(
            "retrying",
            job_id=job.job_id,
            tenant=job.tenant,
            document=f"{job.document.type.value} {job.document.number}",
            reason=error.reason,
            detail=str(error),
            smtp_reply=error.smtp_reply,
            duration_ms=round((time.monotonic() - started) * 1000),
        )

    def _dead_letter_invalid(self, data: Any, error: InvalidJob) -> None:
        message = CurrentMessage.get_current_message()
        job_id = _job_id_of(data)
        tenant = data.get("tenant") if isinstance(data, dict) else None
        with self.db.connection() as conn:
            store_dead_job(
                conn,
                DeadJob(
                    id=str(job_id) if job_id else _message_id(),
                    queue_name=message.queue_name if message else "",
                    reason=error.reason,
                    detail=str(error),
                    attempts=1,
                    job_id=job_id,
                    tenant=tenant if isinstance(tenant, str) else None,
                    message=message.asdict() if message else None,
                ),
            )
        metrics.DEAD_LETTERED.labels("unknown", "unknown", error.reason).inc()
        log_outcome("failed", job_id=job_id, reason=error.reason, detail=str(error))


class ClaimedElsewhere(Exception):
    """Another live delivery holds the job's claim (a redelivery while the first is still sending)."""

    def __init__(self, job_id: UUID, retry_in_ms: int) -> None:
        super().__init__(f"job {job_id} is being sent by another worker")
        self.retry_in_ms = retry_in_ms


def register_actor(broker: dramatiq.Broker, pipeline: Pipeline, prefix: str, lane: str) -> str:
    """Declare the actor of a lane (bulk ``documents`` or interactive ``receipts``); returns its queue."""
    queue = queue_name(prefix, lane)
    dramatiq.Actor(
        pipeline.process,
        broker=broker,
        actor_name=actor_of(lane),
        queue_name=queue,
        priority=0 if lane == RECEIPTS_QUEUE else 10,
        options={},
    )
    pipeline.brokers[queue] = broker
    return queue


def _validation_summary(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "job"
        parts.append(f"{where}: {item['msg']}")
    return "invalid job: " + "; ".join(parts)


def _job_id_of(data: Any) -> UUID | None:
    try:
        return UUID(str(data["job_id"])) if isinstance(data, dict) and "job_id" in data else None
    except ValueError:
        return None


def _message_id() -> str:
    message = CurrentMessage.get_current_message()
    return message.message_id if message else str(uuid.uuid4())


__all__ = ["Pipeline", "payload_digest", "register_actor"]
