"""Retries with exponential backoff and jitter; a job out of attempts or age is dead-lettered.

dramatiq's own ``Retries`` rejects an exhausted message into RabbitMQ's ``.XQ``
queue, which keeps no reason and drops it after seven days. This middleware
replaces it: an exhausted job is handed to ``give_up`` (ledger ``failed`` plus a
row in the dead-letter store, with the final reason) and the message is then
acknowledged, so no second copy lingers in the broker.

A delayed retry is published to the ``.DQ`` queue and held *unacknowledged* by
a consumer until it is due; ``max_backoff_ms`` is therefore capped far below
RabbitMQ's 30-minute consumer timeout (see ``Settings.max_backoff_ms``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from worker.errors import (
    BrokerUnavailable,
    ClaimedElsewhere,
    DatabaseUnavailable,
    OutcomeUnrecorded,
    PostboteError,
    TransientError,
)
from worker.settings import Settings
from worker.vocabulary import Reason

logger = logging.getLogger(__name__)

FAILED_ATTEMPTS = "retries"
"""Message option: failed attempts so far (dramatiq's name, so its tooling reads it)."""
REQUEUES = "requeues"
"""Message option: times the message was put back, counted or not; drives the backoff."""
PUBLISHER = "publisher"
"""Message option: the RabbitMQ user that published the job (its ``user_id`` property), set by
the worker's consumer; a requeued message keeps the original publisher."""
UNRECORDED_OUTCOME = "unrecorded_outcome"
"""Message option: an SMTP outcome the ledger could not take yet (see ``OutcomeUnrecorded``)."""

QUIET_FAILURES = (TransientError,)
"""The actors' ``throws`` option. dramatiq logs an exception of these classes without a
traceback, since they are expected; whether it is retried is this middleware's decision,
not dramatiq's (dramatiq's own ``Retries`` middleware is not installed)."""

NOT_THE_JOBS_FAULT = (DatabaseUnavailable, BrokerUnavailable, ClaimedElsewhere, OutcomeUnrecorded)
"""Errors that do not use up an attempt: our own infrastructure, or another worker's claim.
Only the maximum age bounds them."""

GiveUp = Callable[[dramatiq.MessageProxy, BaseException, Reason, str, int], None]
"""Records a job as dead: ``(message, last error, reason, detail, failed attempts)``.
May raise ``DatabaseUnavailable``; the message is then retried until it can be recorded."""


def backoff_ms(requeues: int, *, min_ms: int, max_ms: int, rng: random.Random | None = None) -> int:
    """Exponential backoff with "equal jitter": between half and all of ``min_ms * 2**requeues``,
    capped at ``max_ms``."""
    base = min(max_ms, min_ms * 2 ** min(requeues, 30))
    return int((rng or random).uniform(base / 2, base))


def retry_delay_ms(message: dramatiq.MessageProxy | dramatiq.Message[Any], settings: Settings) -> int:
    """The backoff before ``message`` is tried again. The jitter is drawn from the message id
    and its requeue count, so the actor can tell the ledger when the retry policy will retry."""
    requeues = int(message.options.get(REQUEUES, 0))
    rng = random.Random(f"{message.message_id}/{requeues}")
    return backoff_ms(requeues, min_ms=settings.min_backoff_ms, max_ms=settings.max_backoff_ms, rng=rng)


class RetryPolicy(Middleware):
    """Retry transient failures; dead-letter (and acknowledge) what cannot be retried any more."""

    def __init__(self, settings: Settings, give_up: GiveUp) -> None:
        self.settings = settings
        self.max_attempts = settings.max_attempts
        self.max_backoff_ms = settings.max_backoff_ms
        self.max_age_ms = settings.max_age_ms
        self.give_up = give_up

    @property
    def actor_options(self) -> set[str]:
        # dramatiq logs exceptions of the ``throws`` classes without a traceback.
        return {"throws"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        options = message.options
        failed = int(options.get(FAILED_ATTEMPTS, 0)) + int(not isinstance(exception, NOT_THE_JOBS_FAULT))
        verdict = self._verdict(message, exception, failed)
        if verdict is not None:
            reason, detail = verdict
            try:
                self.give_up(message, exception, reason, detail, failed)
                return
            except DatabaseUnavailable as e:
                logger.warning("cannot dead-letter message %s yet (%s); retrying it", message.message_id, e)
        delay = self._delay_ms(message, exception)
        options[FAILED_ATTEMPTS] = failed
        options[REQUEUES] = int(options.get(REQUEUES, 0)) + 1
        if isinstance(exception, OutcomeUnrecorded):
            options[UNRECORDED_OUTCOME] = exception.outcome
        else:
            # Recorded now: the next delivery sends to whoever is still waiting.
            options.pop(UNRECORDED_OUTCOME, None)
        try:
            broker.enqueue(message.copy(), delay=delay)
        except Exception:
            # Rejected, RabbitMQ moves it to the .XQ queue; the sweeper brings it into the store.
            logger.exception("cannot requeue message %s; rejecting it", message.message_id)
            message.fail()

    def _verdict(
        self, message: dramatiq.MessageProxy, exception: BaseException, failed: int
    ) -> tuple[Reason, str] | None:
        reason = exception.reason if isinstance(exception, PostboteError) else Reason.INTERNAL_ERROR
        last = f"{reason}: {exception or type(exception).__name__}"
        if failed >= self.max_attempts:
            return reason, f"gave up after {failed} failed attempts; last error {last}"
        age_ms = int(time.time() * 1000) - int(message.message_timestamp)
        if age_ms >= self.max_age_ms:
            return (
                Reason.MAX_AGE_EXCEEDED,
                f"first published {age_ms // 1000} s ago, longer than max_age_ms"
                f" ({self.max_age_ms // 1000} s); last error {last}",
            )
        return None

    def _delay_ms(self, message: dramatiq.MessageProxy, exception: BaseException) -> int:
        if isinstance(exception, ClaimedElsewhere):
            # Come back about when the other claim ends, not later than a normal backoff would.
            wait = exception.retry_in_ms + random.randint(50, 250)
            return min(wait, self.max_backoff_ms)
        return retry_delay_ms(message, self.settings)


__all__ = [
    "FAILED_ATTEMPTS",
    "PUBLISHER",
    "QUIET_FAILURES",
    "REQUEUES",
    "UNRECORDED_OUTCOME",
    "GiveUp",
    "RetryPolicy",
    "backoff_ms",
    "retry_delay_ms",
]
