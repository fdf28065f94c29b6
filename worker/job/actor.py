"""Wires the stages together: job → ledger claim → sender → message → signature → series slot → SMTP → ledger.

Only this module knows the order. Each stage takes and returns plain values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

import dramatiq
from dramatiq.middleware import CurrentMessage
from pydantic import ValidationError

from schemas.constants import RECEIPTS_QUEUE, actor_of, queue_name
from schemas.job import DocumentType, Job
from worker.db import make_pool
from worker.errors import (
    ClaimedElsewhere,
    DatabaseUnavailable,
    DeliveryDeferred,
    DeliveryFailed,
    InvalidJob,
    OutcomeUnrecorded,
    PermanentError,
    SenderNotPermitted,
    TransientError,
)
from worker.job.accounts import Account, AccountCache
from worker.job.addresses import needs_smtputf8
from worker.job.compose import Composed, compose_message
from worker.job.deadletter import dead_entry, store_dead_job
from worker.job.ledger import (
    Claim,
    Progress,
    claim_job,
    load_progress,
    record_attempt,
    record_failure,
    record_given_up,
    release_claim,
    renew_claim,
)
from worker.job.outcome import AttemptRecord, Fate, State, Status, settle
from worker.job.ratelimit import PostgresBackend, SeriesLimiter, Throttled
from worker.job.recipients import Recipients, recipients_for
from worker.job.senders import resolve_sender
from worker.job.signature import DkimSigner, load_signer, sign_message
from worker.job.smtp import SmtpPool, SmtpReply
from worker.logs import log_outcome
from worker.runtime import metrics
from worker.runtime.middleware.retries import UNRECORDED_OUTCOME, retry_delay_ms
from worker.settings import Settings

logger = logging.getLogger(__name__)

_SIGNER_REFRESH_S = 60.0


def payload_digest(data: dict[str, Any]) -> str:
    """Fingerprint of a job's content: the same job id with another payload is a conflict.

    Independent of key order (a replayed job comes back from a jsonb column). Attachment
    contents are hashed as they are instead of going through the JSON encoder.
    """
    attachments = data.get("attachments")
    contents: list[bytes] = []
    if isinstance(attachments, list) and all(isinstance(a, dict) for a in attachments):
        contents = [str(a.get("content_base64", "")).encode() for a in attachments]
        data = {
            **data,
            "attachments": [{k: v for k, v in a.items() if k != "content_base64"} for a in attachments],
        }
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    for content in contents:
        digest.update(b"\0" + content)
    return digest.hexdigest()


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
        self._signers: dict[str, tuple[object, DkimSigner, float]] = {}
        self._signers_lock = threading.Lock()
        self.limiter = SeriesLimiter(
            PostgresBackend(self.settings.database_url),
            holder_id=self.holder,
            lease_ms=self.settings.series_lease_ms,
        )
        self.brokers: dict[str, dramatiq.Broker] = {}

    def _signer(self, account: Account) -> DkimSigner:
        """The tenant's signer: rebuilt when its DKIM settings change, and at least every minute
        so a key file replaced on disk is picked up; one thread builds it while the others wait."""
        assert account.dkim is not None
        cached = self._signers.get(account.id)
        now = time.monotonic()
        if cached is not None and cached[0] == account.dkim and now - cached[2] < _SIGNER_REFRESH_S:
            return cached[1]
        with self._signers_lock:
            cached = self._signers.get(account.id)
            if cached is None or cached[0] != account.dkim or now - cached[2] >= _SIGNER_REFRESH_S:
                cached = self._signers[account.id] = (account.dkim, load_signer(account.dkim), now)
        return cached[1]

    def close(self) -> None:
        self.limiter.close()
        self.limiter.backend.close()
        self.smtp.close()
        self.db.close()

    def process(self, *args: Any, **kwargs: Any) -> None:
        """Handle one job message; permanent failures are recorded and dead-lettered, transient ones raised."""
        started = time.monotonic()
        if len(args) != 1 or kwargs:
            problem = f"expected one job argument, got {len(args)} and {len(kwargs)} keyword arguments"
            self._dead_letter_invalid(
                args, InvalidJob(f"not a postbote job message: {problem}", reason="not_a_job")
            )
            return
        data = args[0]
        try:
            job = Job.model_validate(data, context={"max_job_bytes": self.settings.max_job_bytes})
        except ValidationError as e:
            self._dead_letter_invalid(data, InvalidJob(_validation_summary(e)))
            return
        message = CurrentMessage.get_current_message()
        carried = message.options.get(UNRECORDED_OUTCOME) if message else None
        try:
            if carried is not None:
                self._conclude(job, AttemptRecord.from_json(carried), started)
            else:
                self._send(job, data, started)
        except Throttled as e:
            with self.db.connection() as conn:
                release_claim(conn, job.job_id)
            self._defer(job, e.retry_in_ms, "deferred_series")
        except PermanentError as e:
            self._fail(job, e, started)
        except TransientError as e:
            # These leave the claim alone: another worker holds it, or the mail went out.
            if not isinstance(e, (ClaimedElsewhere, OutcomeUnrecorded)):
                self._retry_later(job, e, started)
            raise

    def _send(self, job: Job, data: dict[str, Any], started: float) -> None:
        claim_ms = self.settings.series_max_wait_ms + 4 * self.settings.smtp_timeout_ms
        claimed_at = time.monotonic()
        with self.db.connection() as conn:
            claim = claim_job(
                conn,
                job,
                payload_digest(data),
                holder=self.holder,
                claim_ms=claim_ms,
                crash_loop_after=self.settings.crash_loop_after,
            )
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
            raise ClaimedElsewhere(
                f"job {job.job_id} is being sent by another worker", retry_in_ms=claim.remaining_ms
            )
        if claim.claim is Claim.CRASH_LOOP:
            raise PermanentError(
                f"{claim.takeovers} deliveries of job {job.job_id} ended with their worker dying",
                reason="crash_loop",
            )
        if claim.claim is Claim.TAKEN_OVER:
            metrics.POSSIBLE_DUPLICATES.labels(job.tenant).inc()

        account = self.accounts.get(job.tenant)
        earlier = None
        if claim.attempts > 1:
            with self.db.connection() as conn:
                earlier = load_progress(conn, job.job_id)
        message, fates = self._message(job, account, earlier)
        attempt_started = time.time()
        receipt = job.document.type is DocumentType.RECEIPT
        # Throttled mail says MAIL FROM and RCPT TO while it waits for its slot, so only DATA
        # is left once the series opens.
        with (
            self.smtp.staged(account.id, account.smtp, message, priority=receipt)
            if account.pause_ms > 0
            else nullcontext() as staged,
            self.limiter.slot(
                account.id,
                batch_size=account.batch_size,
                pause_ms=account.pause_ms,
                priority=receipt,
                max_wait_ms=self.settings.series_max_wait_ms,
            ) as slot,
        ):
            metrics.RATELIMIT_WAIT_SECONDS.labels(job.tenant).observe(slot.waited_ms / 1000)
            if time.monotonic() - claimed_at > claim_ms / 2000:
                # A long series wait must not outlive the claim; a short one leaves it ample time.
                with self.db.connection() as conn:
                    if not renew_claim(conn, job.job_id, holder=self.holder, claim_ms=claim_ms):
                        raise ClaimedElsewhere(
                            f"job {job.job_id} was taken over before sending", retry_in_ms=claim_ms
                        )
            sent_at = time.monotonic()
            if staged is not None:
                delivery = staged.deliver()
            else:
                delivery = self.smtp.deliver(account.id, account.smtp, message)
            metrics.SMTP_SEND_SECONDS.labels(job.tenant).observe(time.monotonic() - sent_at)
        verdict = settle(fates, delivery)
        current = CurrentMessage.get_current_message()
        waiting = verdict.status is Status.RETRYING
        record = AttemptRecord(
            job_id=job.job_id,
            attempt=claim.attempts,
            started_at=attempt_started,
            duration_ms=round((time.time() - attempt_started) * 1000),
            worker=self.holder,
            tried=message.recipients,
            sender=message.mail_from,
            message_id=message.message_id,
            reply=str(delivery.error) if delivery.error is not None else _reply_text(delivery.reply),
            verdict=verdict,
            message=message.data if waiting and verdict.reached else None,
            next_attempt_ms=retry_delay_ms(current, self.settings) if waiting and current else None,
        )
        self._conclude(job, record, started)

    def _message(
        self, job: Job, account: Account, earlier: Progress | None
    ) -> tuple[Composed, tuple[Fate, ...]]:
        """The message of this attempt and the recipients' fates before it.

        A job some recipients already got goes to the ones still pending with the very
        bytes the others got; otherwise it is composed and signed anew, for the recipients
        not yet refused for good.
        """
        if earlier is not None and earlier.fates:
            pending = [f for f in earlier.fates if f.state is State.PENDING]
            reached = any(f.role.customer_facing and f.state is State.ACCEPTED for f in earlier.fates)
            internal = frozenset(
                () if reached else (f.address for f in pending if not f.role.customer_facing)
            )
            addresses = tuple(f.address for f in pending)
            if earlier.message is not None and earlier.sender and earlier.message_id:
                kept = Composed(
                    data=earlier.message,
                    mail_from=earlier.sender,
                    recipients=addresses,
                    message_id=earlier.message_id,
                    smtputf8=any(needs_smtputf8(a) for a in (earlier.sender, *addresses)),
                    internal=internal,
                )
                return kept, earlier.fates
            composed = self._compose(job, account)
            return replace(composed, recipients=addresses, internal=internal), earlier.fates
        recipients = recipients_for(job, account)
        return self._compose(job, account, recipients), tuple(
            Fate(r.address, r.role) for r in recipients.envelope
        )

    def _compose(self, job: Job, account: Account, recipients: Recipients | None = None) -> Composed:
        recipients = recipients or recipients_for(job, account)
        message = compose_message(job, resolve_sender(job, account), recipients)
        if account.dkim is not None:
            signing_started = time.monotonic()
            message = replace(message, data=sign_message(message.data, self._signer(account)))
            metrics.DKIM_SIGN_SECONDS.observe(time.monotonic() - signing_started)
        return message

    def _conclude(self, job: Job, record: AttemptRecord, started: float) -> None:
        """Record an attempt and act on its verdict: count a sent job, or raise for a retry or the
        dead-letter queue (the ledger then already holds the outcome)."""
        status = self._record_durably(record)
        verdict = record.verdict
        for fate in verdict.settled:
            metrics.RECIPIENTS.labels(job.tenant, fate.role.value, fate.state.value).inc()
        if status is Status.RETRYING:
            raise DeliveryDeferred(
                verdict.detail or "recipients waiting", reason=verdict.reason, smtp_reply=verdict.smtp_reply
            )
        if status is Status.FAILED:
            raise DeliveryFailed(
                verdict.detail or "no recipient accepted",
                reason=verdict.reason,
                smtp_reply=verdict.smtp_reply,
            )
        metrics.MAILS_SENT.labels(job.tenant, job.document.type.value).inc()
        refused = [f.address for f in verdict.fates if f.state is State.REFUSED]
        log_outcome(
            status.value,
            job_id=job.job_id,
            tenant=job.tenant,
            document=f"{job.document.type.value} {job.document.number}",
            sender=record.sender,
            smtp_reply=verdict.smtp_reply,
            refused=",".join(refused) or None,
            duration_ms=round((time.monotonic() - started) * 1000),
        )

    def _defer(self, job: Job, delay_ms: int, outcome: str) -> None:
        """Waiting is not failing: hand the job back to the broker for later without using a retry."""
        message = CurrentMessage.get_current_message()
        assert message is not None
        # Capped like a retry's backoff: a delayed message waits unacknowledged in the consumer.
        delay_ms = min(delay_ms, self.settings.max_backoff_ms)
        self.brokers[message.queue_name].enqueue(message.copy(), delay=delay_ms)
        log_outcome(outcome, job_id=job.job_id, tenant=job.tenant, retry_in_ms=delay_ms)

    def _record_durably(self, record: AttemptRecord) -> Status:
        """After the server answered, the ledger write must not be lost to a database blip.
        Retry it briefly; a longer outage raises ``OutcomeUnrecorded`` so the outcome rides with
        the requeued message and the next delivery records it without sending again."""
        deadline = time.monotonic() + 2 * self.settings.smtp_timeout_ms / 1000
        delay = 0.2
        while True:
            try:
                with self.db.connection() as conn:
                    return record_attempt(conn, record)
            except DatabaseUnavailable as e:
                if time.monotonic() > deadline:
                    raise OutcomeUnrecorded(
                        f"attempted, but the ledger is unavailable: {e}", outcome=record.to_json()
                    ) from e
                logger.warning("ledger write for job %s failed; retrying in %.1fs", record.job_id, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _fail(self, job: Job, error: PermanentError, started: float) -> None:
        message = CurrentMessage.get_current_message()
        # A reused job id must touch neither the original job's ledger row nor its dead entry.
        conflict = error.reason == "job_id_conflict"
        with self.db.connection() as conn:
            if not conflict and not isinstance(error, DeliveryFailed):
                refused = error if isinstance(error, SenderNotPermitted) else None
                record_failure(
                    conn,
                    job.job_id,
                    final=True,
                    reason=error.reason,
                    detail=str(error),
                    smtp_reply=error.smtp_reply,
                    sender=refused.sender if refused else None,
                    recipients=recipients_for(job, self.accounts.get(job.tenant)).envelope if refused else (),
                )
            store_dead_job(
                conn,
                dead_entry(
                    message,
                    reason=error.reason,
                    detail=str(error),
                    attempts=int(message.options.get("retries", 0)) + 1 if message else 1,
                    job=job,
                    smtp_reply=error.smtp_reply,
                    keyed_by_message=conflict,
                ),
            )
        metrics.MAILS_FAILED.labels(job.tenant, job.document.type.value, error.reason).inc()
        metrics.DEAD_LETTERED.labels(job.tenant, job.document.type.value, error.reason).inc()
        _log_failure("failed", job, error, started)

    def _retry_later(self, job: Job, error: TransientError, started: float) -> None:
        metrics.RETRIES.labels(job.tenant, job.document.type.value, error.reason).inc()
        message = CurrentMessage.get_current_message()
        try:
            if not isinstance(error, DeliveryDeferred):
                with self.db.connection() as conn:
                    record_failure(
                        conn,
                        job.job_id,
                        final=False,
                        reason=error.reason,
                        detail=str(error),
                        smtp_reply=error.smtp_reply,
                        next_attempt_ms=retry_delay_ms(message, self.settings) if message else None,
                    )
        except DatabaseUnavailable:
            pass
        _log_failure("retrying", job, error, started)

    def give_up(
        self, message: dramatiq.MessageProxy, error: BaseException, reason: str, detail: str, attempts: int
    ) -> None:
        """Dead-letter a message the retry policy will not retry again (see ``RetryPolicy``)."""
        data: Any = message.args[0] if len(message.args) == 1 else None
        smtp_reply = getattr(error, "smtp_reply", None)
        try:
            job: Job | None = Job.model_validate(data, context={"max_job_bytes": self.settings.max_job_bytes})
        except ValidationError:
            job = None
        with self.db.connection() as conn:
            verdict = None
            if job is not None:
                verdict = record_given_up(
                    conn, job, payload_digest(data), reason=reason, detail=detail, smtp_reply=smtp_reply
                )
                if verdict is None:
                    return
                for fate in verdict.settled:
                    metrics.RECIPIENTS.labels(job.tenant, fate.role.value, fate.state.value).inc()
                if verdict.status is not Status.FAILED:
                    metrics.MAILS_SENT.labels(job.tenant, job.document.type.value).inc()
                    log_outcome(
                        verdict.status.value, job_id=job.job_id, tenant=job.tenant, detail=verdict.detail
                    )
                    return
            store_dead_job(
                conn,
                dead_entry(
                    message, reason=reason, detail=detail, attempts=attempts, job=job, smtp_reply=smtp_reply
                ),
            )
        labels = (job.tenant, job.document.type.value) if job else ("unknown", "unknown")
        metrics.MAILS_FAILED.labels(*labels, reason).inc()
        metrics.DEAD_LETTERED.labels(*labels, reason).inc()
        log_outcome(
            "failed", job_id=job.job_id if job else None, reason=reason, detail=detail, smtp_reply=smtp_reply
        )

    def _dead_letter_invalid(self, data: Any, error: InvalidJob) -> None:
        message = CurrentMessage.get_current_message()
        job_id = _job_id_of(data)
        tenant = data.get("tenant") if isinstance(data, dict) else None
        with self.db.connection() as conn:
            store_dead_job(
                conn,
                dead_entry(
                    message,
                    reason=error.reason,
                    detail=str(error),
                    attempts=1,
                    job_id=job_id,
                    tenant=tenant if isinstance(tenant, str) else None,
                ),
            )
        metrics.DEAD_LETTERED.labels("unknown", "unknown", error.reason).inc()
        log_outcome("failed", job_id=job_id, reason=error.reason, detail=str(error))


def _reply_text(reply: SmtpReply | None) -> str | None:
    return str(reply) if reply is not None else None


def _log_failure(outcome: str, job: Job, error: PermanentError | TransientError, started: float) -> None:
    log_outcome(
        outcome,
        job_id=job.job_id,
        tenant=job.tenant,
        document=f"{job.document.type.value} {job.document.number}",
        reason=error.reason,
        detail=str(error),
        smtp_reply=error.smtp_reply,
        duration_ms=round((time.monotonic() - started) * 1000),
    )


def register_actor(broker: dramatiq.Broker, pipeline: Pipeline, prefix: str, lane: str) -> str:
    """Declare the actor of a lane (bulk ``documents`` or interactive ``receipts``); returns its queue."""
    queue = queue_name(prefix, lane)
    dramatiq.Actor(
        pipeline.process,
        broker=broker,
        actor_name=actor_of(lane),
        queue_name=queue,
        priority=0 if lane == RECEIPTS_QUEUE else 10,
        options={"throws": (TransientError,)},
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


__all__ = ["Pipeline", "payload_digest", "register_actor"]
