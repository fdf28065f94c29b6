"""Wires the stages together, in this order:

intake → ledger claim (directives, schedule, expiry) → accounts → senders → recipients →
compose → signature → series slot → last check before DATA → SMTP → outcome → ledger record
(→ dead-letter store, or a retry). A job that must wait is parked in PostgreSQL
(``worker.job.parking``) at whichever step finds out.

Only this module knows the order. Each stage takes and returns plain values.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import dramatiq
import pika.exceptions
import psycopg
from cachetools import TTLCache
from dramatiq.common import q_name
from dramatiq.middleware import CurrentMessage
from psycopg_pool import PoolTimeout

from schemas.constants import RECEIPTS_QUEUE, actor_of, queue_name
from schemas.job import DocumentType, Job
from worker.db import CONNECT_TIMEOUT_S, answer_limit_s, connect, make_pool
from worker.errors import (
    BrokerUnavailable,
    ClaimedElsewhere,
    CrashLoop,
    DatabaseUnavailable,
    DeliveryDeferred,
    DeliveryFailed,
    InternalError,
    InvalidJob,
    JobIdConflict,
    MustWait,
    OutcomeUnrecorded,
    PermanentError,
    PostboteError,
    PublisherNotPermitted,
    SenderNotPermitted,
    Throttled,
    TransientError,
)
from worker.job.accounts import Account, AccountCache, SecretAccess
from worker.job.addresses import needs_smtputf8
from worker.job.breaker import LoginBreaker
from worker.job.compose import Composed, compose_message
from worker.job.deadletter import dead_job, store_dead_job
from worker.job.intake import job_id_of, payload_digest, read_job, tenant_of
from worker.job.ledger import (
    Claim,
    ClaimResult,
    Progress,
    claim_job,
    load_progress,
    record_attempt,
    record_failure,
    record_given_up,
    renew_claim,
    session_name,
)
from worker.job.ledger_batch import LedgerBatcher
from worker.job.outcome import AttemptRecord, Fate, settle
from worker.job.parking import Check, before_data, park
from worker.job.ratelimit import PostgresBackend, SeriesLimiter
from worker.job.recipients import customer_recipients, recipients_for
from worker.job.senders import resolve_sender
from worker.job.signature import DkimSigner, load_signer, sign_message
from worker.job.smtp import Delivery, SmtpPool
from worker.job.smtp.oauth import TokenHelpers
from worker.job.suppression import hold_if_suppressed
from worker.logs import log_outcome
from worker.runtime import metrics
from worker.runtime.middleware.retries import PUBLISHER, QUIET_FAILURES, UNRECORDED_OUTCOME, retry_delay_ms
from worker.runtime.seal import SEAL
from worker.settings import Settings
from worker.vocabulary import LogOutcome, Reason, RecipientState, Status

logger = logging.getLogger(__name__)

_RECHECK_AFTER_S = 0.2
"""An unthrottled job that reaches DATA later than this after its claim checks the directives again."""

_SIGNER_REFRESH_S = 60.0
"""A signer is rebuilt at least this often, so a key file replaced on disk is picked up."""


class JobStopped(PostboteError):
    """The last check before DATA stopped the job (``check``): it ended, or is another's now."""

    def __init__(self, check: Check) -> None:
        super().__init__(f"stopped before DATA: {check.value}")
        self.check = check


class Pipeline:
    """The per-process resources of the stages, and the order they run in.

    ``tenant_threads``: the most threads one throttled tenant's bulk jobs may hold at once in this
    process, waiting for their series slot.
    """

    def __init__(self, settings: Settings, *, holder: str | None = None, tenant_threads: int = 4) -> None:
        self.settings = settings
        self.tenant_threads = tenant_threads
        self._busy: Counter[str] = Counter()
        self._busy_lock = threading.Lock()
        self.holder = holder or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        # Named, so the supervisor can end a dead process's sessions before it releases its claims.
        session = session_name(self.holder)
        self.db = make_pool(
            settings.database_url,
            max_size=16,
            statement_timeout_ms=settings.statement_timeout_ms,
            application_name=session,
        )
        limit_s = answer_limit_s(settings.statement_timeout_ms)
        self.ledger = LedgerBatcher(
            lambda: connect(
                settings.database_url,
                autocommit=True,
                statement_timeout_ms=settings.statement_timeout_ms,
                application_name=session,
            ),
            # One batch ahead of its own, and a connection opened anew.
            wait_s=2 * limit_s + CONNECT_TIMEOUT_S if limit_s is not None else None,
            writers=lambda: self._working,
        )
        self._working = 0
        self._working_lock = threading.Lock()
        self.accounts = AccountCache(
            self.db.connection, ttl_ms=settings.settings_cache_ms, access=SecretAccess.from_settings(settings)
        )
        self.smtp = SmtpPool(
            timeout_ms=settings.smtp_timeout_ms,
            on_connect=lambda tenant: metrics.SMTP_CONNECTIONS_OPENED.labels(tenant).inc(),
            token_helpers=TokenHelpers(settings.token_helpers, settings.token_helper_timeout_ms / 1000),
            breaker=LoginBreaker(
                self.db.connection, hold_ms=settings.login_hold_ms, probe_ms=4 * settings.smtp_timeout_ms
            ),
        )
        self.limiter = SeriesLimiter(
            PostgresBackend(settings.database_url, statement_timeout_ms=settings.statement_timeout_ms),
            holder_id=self.holder,
            lease_ms=settings.series_lease_ms,
        )
        self.brokers: dict[str, dramatiq.Broker] = {}
        self._signers: TTLCache[str, tuple[object, DkimSigner]] = TTLCache(
            maxsize=4096, ttl=_SIGNER_REFRESH_S
        )
        self._signers_lock = threading.Lock()

    def close(self) -> None:
        self.ledger.close()
        self.limiter.close()
        self.limiter.backend.close()
        self.smtp.close()
        self.db.close()

    def process(self, *args: Any, **kwargs: Any) -> None:
        """Handle one job message; permanent failures are recorded and dead-lettered, transient ones raised."""
        with self._working_lock:
            self._working += 1
        try:
            self._process(*args, **kwargs)
        finally:
            with self._working_lock:
                self._working -= 1

    def _process(self, *args: Any, **kwargs: Any) -> None:
        started = time.monotonic()
        message = CurrentMessage.get_current_message()
        message_id = message.message_id if message else str(uuid.uuid4())
        try:
            job, data = read_job(
                args, kwargs, message_id=message_id, max_job_bytes=self.settings.max_job_bytes
            )
        except InvalidJob as e:
            self._dead_letter_invalid(args[0] if len(args) == 1 else args, e)
            return
        carried = message.options.get(UNRECORDED_OUTCOME) if message else None
        try:
            try:
                if carried is not None:
                    self._conclude(job, AttemptRecord.from_json(carried), started)
                else:
                    self._send(
                        job, data, started, publisher=message.options.get(PUBLISHER) if message else None
                    )
            except (PostboteError, dramatiq.errors.DramatiqError):
                raise
            except (psycopg.Error, PoolTimeout) as e:
                raise DatabaseUnavailable(f"database unavailable: {e}") from e
            except pika.exceptions.AMQPError as e:
                raise BrokerUnavailable(f"broker unavailable: {e or type(e).__name__}") from e
            except Exception as e:
                # A bug or an input no stage foresaw: recorded and dead-lettered with what it was,
                # never left claimed (a claim left behind looks like a dead worker's).
                logger.exception("job %s failed unexpectedly", job.job_id)
                raise InternalError(f"{type(e).__name__}: {e}") from e
        except Throttled as e:
            self._park(
                job, MustWait(str(e), reason=Reason.SERIES, status=Status.RETRYING, wait_ms=e.retry_in_ms)
            )
        except MustWait as e:
            self._park(job, e)
        except JobStopped as e:
            log_outcome(LogOutcome.STOPPED, job_id=job.job_id, tenant=job.tenant, detail=e.check.value)
        except PermanentError as e:
            self._fail(job, e, started)
        except TransientError as e:
            # These leave the claim alone: another worker holds it, or the server answered.
            if not isinstance(e, ClaimedElsewhere | OutcomeUnrecorded):
                self._retry_later(job, e, started)
            raise

    def _send(self, job: Job, data: dict[str, Any], started: float, *, publisher: str | None) -> None:
        claim_ms = self.settings.series_max_wait_ms + 4 * self.settings.smtp_timeout_ms
        claimed_at = time.monotonic()
        claim = self._claim(job, data, claim_ms, series_wait_ms=self._series_wait_ms(job))
        if claim is None:
            return
        if claim.claim is Claim.PARK:
            assert claim.reason is not None and claim.status is not None
            raise MustWait(
                claim.detail or claim.reason, reason=claim.reason, status=claim.status, wait_ms=claim.wait_ms
            )
        account = self.accounts.get(job.tenant)
        if account.publishers is not None and publisher not in account.publishers:
            who = f"RabbitMQ user {publisher!r}" if publisher else "a message without a user_id property"
            raise PublisherNotPermitted(f"{who} may not publish jobs for tenant {job.tenant!r}")
        if claim.suppressed:
            with self.db.connection() as conn:
                hold_if_suppressed(conn, job)
        message, fates = self._prepare(job, account, claim)
        attempt_started = time.time()
        delivery = self._transmit(job, account, message, claimed_at, claim_ms)
        self._conclude(
            job, self._attempt_record(job, claim, message, fates, delivery, attempt_started), started
        )

    def _tenant_label(self, job: Job) -> str:
        return job.tenant if self.accounts.known(job.tenant) else "unknown"

    def _series_wait_ms(self, job: Job) -> int | None:
        """How far away a throttled tenant's next bulk slot is, when that is further than a thread
        should wait (as far as this process knows; no database call)."""
        if job.document.type is DocumentType.RECEIPT or not self.accounts.known(job.tenant):
            return None
        account = self.accounts.get(job.tenant)
        if account.pause_ms == 0:
            return None
        ahead_ms = self.limiter.expected_wait_ms(account.id)
        return ahead_ms if ahead_ms > self.settings.series_park_after_ms else None

    def _claim(
        self, job: Job, data: dict[str, Any], claim_ms: int, *, series_wait_ms: int | None
    ) -> ClaimResult | None:
        """Claim the job in the ledger; ``None`` when it already ended, or ended now (cancelled,
        expired), or was parked now: acknowledged unsent."""
        message = CurrentMessage.get_current_message()
        published = message.message_timestamp if message else None
        schedule = job.not_before is not None and job.not_before.timestamp() > time.time()
        parking = self._parked_message() if message and (series_wait_ms is not None or schedule) else None
        claim = claim_job(
            self.ledger,
            job,
            payload_digest(data),
            holder=self.holder,
            claim_ms=claim_ms,
            crash_loop_after=self.settings.crash_loop_after,
            published_ms=published if isinstance(published, int) else None,
            parking=parking,
            series_wait_ms=series_wait_ms,
            customers=[r.address for r in customer_recipients(job).envelope],
        )
        if claim.claim is Claim.PARKED:
            log_outcome(
                LogOutcome.PARKED,
                job_id=job.job_id,
                tenant=job.tenant,
                reason=claim.reason,
                retry_in_ms=claim.wait_ms,
            )
            return None
        if claim.claim in (Claim.CANCELLED, Claim.EXPIRED):
            log_outcome(
                LogOutcome(claim.claim.value),
                job_id=job.job_id,
                tenant=job.tenant,
                document=f"{job.document.type.value} {job.document.number}",
            )
            return None
        if claim.claim is Claim.DONE:
            metrics.DUPLICATES_PREVENTED.labels(self._tenant_label(job)).inc()
            log_outcome(
                LogOutcome.DUPLICATE_PREVENTED,
                job_id=job.job_id,
                tenant=job.tenant,
                document=f"{job.document.type.value} {job.document.number}",
                status=claim.status,
            )
            return None
        if claim.claim is Claim.CONFLICT:
            raise JobIdConflict(f"job id {job.job_id} was already used for a different payload")
        if claim.claim is Claim.BUSY:
            raise ClaimedElsewhere(
                f"job {job.job_id} is being sent by another worker", retry_in_ms=claim.remaining_ms
            )
        if claim.claim is Claim.CRASH_LOOP:
            raise CrashLoop(f"{claim.takeovers} deliveries of job {job.job_id} ended with their worker dying")
        if claim.claim is Claim.TAKEN_OVER:
            metrics.POSSIBLE_DUPLICATES.labels(self._tenant_label(job)).inc()
        return claim

    def _prepare(self, job: Job, account: Account, claim: ClaimResult) -> tuple[Composed, tuple[Fate, ...]]:
        """The message of this attempt and the recipients' fates before it.

        A job some recipients already got goes to the ones still pending with the very
        bytes the others got; otherwise it is composed and signed anew, for the recipients
        not yet refused for good.
        """
        earlier: Progress | None = None
        if claim.attempts > 1:
            with self.db.connection() as conn:
                earlier = load_progress(conn, job.job_id)
        if earlier is None or not earlier.fates:
            recipients = recipients_for(job, account)
            message = compose_message(
                job,
                resolve_sender(job, account),
                recipients,
                verp_domain=account.verp_domain,
                dsn=account.dsn,
            )
            return self._signed(message, account), tuple(Fate(r.address, r.role) for r in recipients.envelope)
        pending = [f for f in earlier.fates if f.state is RecipientState.PENDING]
        reached = any(f.role.customer_facing and f.state is RecipientState.ACCEPTED for f in earlier.fates)
        internal = frozenset(() if reached else (f.address for f in pending if not f.role.customer_facing))
        addresses = tuple(f.address for f in pending)
        if earlier.message is not None and earlier.sender and earlier.message_id:
            kept = Composed(
                data=earlier.message,
                mail_from=earlier.sender,
                recipients=addresses,
                message_id=earlier.message_id,
                smtputf8=any(needs_smtputf8(a) for a in (earlier.sender, *addresses)),
                internal=internal,
                envid=str(job.job_id) if account.dsn else None,
            )
            return kept, earlier.fates
        message = compose_message(
            job,
            resolve_sender(job, account),
            recipients_for(job, account),
            verp_domain=account.verp_domain,
            dsn=account.dsn,
        )
        return replace(self._signed(message, account), recipients=addresses, internal=internal), earlier.fates

    def _signed(self, message: Composed, account: Account) -> Composed:
        if account.dkim is None:
            return message
        signing_started = time.monotonic()
        signed = replace(message, data=sign_message(message.data, self._signer(account)))
        metrics.DKIM_SIGN_SECONDS.observe(time.monotonic() - signing_started)
        return signed

    def _signer(self, account: Account) -> DkimSigner:
        """The tenant's signer: rebuilt when its DKIM settings change, and at least every minute;
        one thread builds it while the others wait."""
        assert account.dkim is not None
        cached = self._signers.get(account.id)
        if cached is not None and cached[0] == account.dkim:
            return cached[1]
        with self._signers_lock:
            cached = self._signers.get(account.id)
            if cached is None or cached[0] != account.dkim:
                cached = self._signers[account.id] = (account.dkim, load_signer(account.dkim))
        return cached[1]

    def _transmit(
        self, job: Job, account: Account, message: Composed, claimed_at: float, claim_ms: int
    ) -> Delivery:
        """The series slot, then SMTP. A throttled tenant's mail says MAIL FROM and RCPT TO while
        it waits for its slot, so only DATA is left once the series opens."""
        receipt = job.document.type is DocumentType.RECEIPT
        max_wait_ms = self.settings.series_max_wait_ms
        if not receipt:
            # A slot further away than this is waited for parked in PostgreSQL, not here.
            max_wait_ms = min(max_wait_ms, self.settings.series_park_after_ms)
        with ExitStack() as stack:
            if not receipt and account.pause_ms > 0:
                ahead_ms = self.limiter.expected_wait_ms(account.id)
                if ahead_ms > max_wait_ms:
                    raise Throttled(account.id, ahead_ms)
                if not self._enter(account.id):
                    # The tenant's jobs already hold their share of this process's threads.
                    raise Throttled(account.id, max(max_wait_ms, 1))
                stack.callback(self._leave, account.id)
            staged = None
            if account.pause_ms > 0:
                staged = stack.enter_context(
                    self.smtp.staged(account.id, account.smtp, message, priority=receipt)
                )
            slot = stack.enter_context(
                self.limiter.slot(
                    account.id,
                    batch_size=account.batch_size,
                    pause_ms=account.pause_ms,
                    priority=receipt,
                    max_wait_ms=max_wait_ms,
                )
            )
            metrics.RATELIMIT_WAIT_SECONDS.labels(job.tenant).observe(slot.waited_ms / 1000)
            if time.monotonic() - claimed_at > claim_ms / 2000:
                # A long series wait must not outlive the claim; a short one leaves it ample time.
                with self.db.connection() as conn:
                    if not renew_claim(conn, job.job_id, holder=self.holder, claim_ms=claim_ms):
                        raise ClaimedElsewhere(
                            f"job {job.job_id} was taken over before sending", retry_in_ms=claim_ms
                        )
            if account.pause_ms > 0 or time.monotonic() - claimed_at > _RECHECK_AFTER_S:
                # A cancel or a pause may have come while the job waited for its slot. Right after
                # the claim, the claim's own check still holds.
                with self.db.connection() as conn:
                    check = before_data(conn, job.job_id, holder=self.holder)
                if check is Check.PAUSED:
                    raise MustWait("paused", reason=Reason.PAUSED, status=Status.HELD, wait_ms=None)
                if check is not Check.GO:
                    raise JobStopped(check)
            sent_at = time.monotonic()
            if staged is not None:
                delivery = staged.deliver()
            else:
                delivery = self.smtp.deliver(account.id, account.smtp, message)
            metrics.SMTP_SEND_SECONDS.labels(job.tenant).observe(time.monotonic() - sent_at)
        return delivery

    def _attempt_record(
        self,
        job: Job,
        claim: ClaimResult,
        message: Composed,
        fates: tuple[Fate, ...],
        delivery: Delivery,
        attempt_started: float,
    ) -> AttemptRecord:
        verdict = settle(fates, delivery)
        current = CurrentMessage.get_current_message()
        waiting = verdict.status is Status.RETRYING
        if delivery.error is not None:
            reply: str | None = str(delivery.error)
        else:
            reply = str(delivery.reply) if delivery.reply is not None else None
        return AttemptRecord(
            job_id=job.job_id,
            attempt=claim.attempts,
            started_at=attempt_started,
            duration_ms=round((time.time() - attempt_started) * 1000),
            worker=self.holder,
            tried=message.recipients,
            sender=message.mail_from,
            message_id=message.message_id,
            reply=reply,
            verdict=verdict,
            message=message.data if waiting and verdict.reached else None,
            next_attempt_ms=retry_delay_ms(current, self.settings) if waiting and current else None,
        )

    def _conclude(self, job: Job, record: AttemptRecord, started: float) -> None:
        """Record an attempt and act on its verdict: count a sent job, or raise for a retry or the
        dead-letter queue (the ledger then already holds the outcome)."""
        status = self._record_durably(record)
        verdict = record.verdict
        for fate in verdict.settled:
            metrics.RECIPIENTS.labels(job.tenant, fate.role, fate.state).inc()
        detail = verdict.detail or ""
        if status is Status.RETRYING:
            raise DeliveryDeferred(detail, reason=verdict.reason, smtp_reply=verdict.smtp_reply)
        if status is Status.FAILED:
            raise DeliveryFailed(detail, reason=verdict.reason, smtp_reply=verdict.smtp_reply)
        metrics.MAILS_SENT.labels(job.tenant, job.document.type.value).inc()
        refused = [f.address for f in verdict.fates if f.state is RecipientState.REFUSED]
        log_outcome(
            LogOutcome(status),
            job_id=job.job_id,
            tenant=job.tenant,
            document=f"{job.document.type.value} {job.document.number}",
            sender=record.sender,
            smtp_reply=verdict.smtp_reply,
            refused=",".join(refused) or None,
            duration_ms=round((time.monotonic() - started) * 1000),
        )

    def _record_durably(self, record: AttemptRecord) -> Status:
        """After the server answered, the ledger write must not be lost to a database blip.
        Retry it briefly; a longer outage raises ``OutcomeUnrecorded`` so the outcome rides with
        the requeued message and the next delivery records it without sending again."""
        deadline = time.monotonic() + 2 * self.settings.smtp_timeout_ms / 1000
        delay = 0.2
        while True:
            try:
                return record_attempt(self.ledger, record)
            except DatabaseUnavailable as e:
                if time.monotonic() > deadline:
                    raise OutcomeUnrecorded(
                        f"attempted, but the ledger is unavailable: {e}", outcome=record.to_json()
                    ) from e
                logger.warning("ledger write for job %s failed; retrying in %.1fs", record.job_id, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _park(self, job: Job, wait: MustWait) -> None:
        """Waiting is not failing: keep the job in PostgreSQL until due (or released), then let
        RabbitMQ forget it. Parked before acknowledged, so a crash in between sends it once more
        to the claim, never loses it."""
        queue, kept = self._parked_message()
        with self.db.connection() as conn:
            parked = park(
                conn,
                job.job_id,
                holder=self.holder,
                reason=wait.reason,
                status=Status(wait.status),
                wait_ms=wait.wait_ms,
                queue=queue,
                message=kept,
                detail=str(wait),
            )
        log_outcome(
            LogOutcome.PARKED if parked else LogOutcome.STOPPED,
            job_id=job.job_id,
            tenant=job.tenant,
            reason=wait.reason,
            retry_in_ms=wait.wait_ms,
        )

    def _parked_message(self) -> tuple[str, bytes]:
        """The current message as it is kept while parked: its lane queue, and the message
        without a delay or a seal (the releaser seals it anew)."""
        message = CurrentMessage.get_current_message()
        assert message is not None
        options = {k: v for k, v in message.options.items() if k not in ("eta", SEAL)}
        queue = q_name(message.queue_name)
        kept: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue,
            actor_name=message.actor_name,
            args=message.args,
            kwargs=message.kwargs,
            options=options,
            message_id=message.message_id,
            message_timestamp=message.message_timestamp,
        )
        return queue, kept.encode()

    def _enter(self, tenant: str) -> bool:
        with self._busy_lock:
            if self._busy[tenant] >= self.tenant_threads:
                return False
            self._busy[tenant] += 1
            return True

    def _leave(self, tenant: str) -> None:
        with self._busy_lock:
            self._busy[tenant] -= 1
            if self._busy[tenant] <= 0:
                del self._busy[tenant]

    def _fail(self, job: Job, error: PermanentError, started: float) -> None:
        message = CurrentMessage.get_current_message()
        # A reused job id must touch neither the original job's ledger row nor its dead entry.
        conflict = isinstance(error, JobIdConflict)
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
                dead_job(
                    message,
                    reason=error.reason,
                    detail=str(error),
                    attempts=int(message.options.get("retries", 0)) + 1 if message else 1,
                    job=job,
                    smtp_reply=error.smtp_reply,
                    keyed_by_message=conflict,
                ),
            )
        tenant = self._tenant_label(job)
        metrics.MAILS_FAILED.labels(tenant, job.document.type.value, error.reason).inc()
        metrics.DEAD_LETTERED.labels(tenant, job.document.type.value, error.reason).inc()
        _log_failure(LogOutcome.FAILED, job, error, started)

    def _retry_later(self, job: Job, error: TransientError, started: float) -> None:
        metrics.RETRIES.labels(self._tenant_label(job), job.document.type.value, error.reason).inc()
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
        _log_failure(LogOutcome.RETRYING, job, error, started)

    def give_up(
        self, message: dramatiq.MessageProxy, error: BaseException, reason: Reason, detail: str, attempts: int
    ) -> None:
        """End a message the retry policy will not retry again (see ``RetryPolicy``): a job some
        customer got ends partial (or sent), any other is dead-lettered."""
        data: Any = message.args[0] if len(message.args) == 1 else None
        smtp_reply = getattr(error, "smtp_reply", None)
        job: Job | None
        try:
            job, data = read_job(
                tuple(message.args),
                dict(message.kwargs),
                message_id=message.message_id,
                max_job_bytes=self.settings.max_job_bytes,
            )
        except InvalidJob:
            job = None
        with self.db.connection() as conn:
            if job is not None:
                verdict = record_given_up(
                    conn, job, payload_digest(data), reason=reason, detail=detail, smtp_reply=smtp_reply
                )
                if verdict is None:
                    return
                for fate in verdict.settled:
                    metrics.RECIPIENTS.labels(job.tenant, fate.role, fate.state).inc()
                if verdict.status.delivered:
                    metrics.MAILS_SENT.labels(job.tenant, job.document.type.value).inc()
                    log_outcome(
                        LogOutcome(verdict.status),
                        job_id=job.job_id,
                        tenant=job.tenant,
                        detail=verdict.detail,
                    )
                    return
            store_dead_job(
                conn,
                dead_job(
                    message, reason=reason, detail=detail, attempts=attempts, job=job, smtp_reply=smtp_reply
                ),
            )
        labels = (self._tenant_label(job), job.document.type.value) if job else ("unknown", "unknown")
        metrics.MAILS_FAILED.labels(*labels, reason).inc()
        metrics.DEAD_LETTERED.labels(*labels, reason).inc()
        log_outcome(
            LogOutcome.FAILED,
            job_id=job.job_id if job else None,
            reason=reason,
            detail=detail,
            smtp_reply=smtp_reply,
        )

    def _dead_letter_invalid(self, data: Any, error: InvalidJob) -> None:
        message = CurrentMessage.get_current_message()
        job_id = job_id_of(data)
        with self.db.connection() as conn:
            store_dead_job(
                conn,
                dead_job(
                    message,
                    reason=error.reason,
                    detail=str(error),
                    attempts=1,
                    job_id=job_id,
                    tenant=tenant_of(data),
                ),
            )
        metrics.DEAD_LETTERED.labels("unknown", "unknown", error.reason).inc()
        log_outcome(LogOutcome.FAILED, job_id=job_id, reason=error.reason, detail=str(error))


def _log_failure(
    outcome: LogOutcome, job: Job, error: PermanentError | TransientError, started: float
) -> None:
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
        options={"throws": QUIET_FAILURES},
    )
    pipeline.brokers[queue] = broker
    return queue


__all__ = ["Pipeline", "register_actor"]
