"""One error hierarchy, split by whether a retry can help.

Each error carries the :class:`~worker.vocabulary.Reason` recorded in the ledger, the
dead-letter store and the metrics. A reason that decides what happens next has a class
of its own, so callers test it with ``isinstance``.
"""

from __future__ import annotations

from typing import Any

from worker.vocabulary import Reason


class PostboteError(Exception):
    """Root of every error postbote raises on purpose."""

    reason: Reason = Reason.ERROR

    def __init__(self, message: str, *, reason: Reason | None = None, smtp_reply: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.smtp_reply = smtp_reply
        """The server's reply (code, enhanced code, text) when an SMTP server caused the error."""


class TransientError(PostboteError):
    """A retry may help: SMTP 4xx, timeouts, connection loss, database or broker outage."""

    reason = Reason.TRANSIENT


class PermanentError(PostboteError):
    """No retry can help; the job goes to the dead-letter queue at once with ``reason``."""

    reason = Reason.PERMANENT


class SmtpTemporaryFailure(TransientError):
    reason = Reason.SMTP_TEMPORARY


class SmtpConnectionError(TransientError):
    reason = Reason.SMTP_CONNECTION


class SmtpTimeout(SmtpConnectionError):
    """The server did not answer in time. After the final dot this is ambiguous: the
    server may have taken the mail, so a retry may deliver it twice (same Message-ID)."""

    reason = Reason.SMTP_TIMEOUT


class OAuthTokenUnavailable(TransientError):
    """The token file or command gave no token (yet)."""

    reason = Reason.OAUTH_TOKEN_UNAVAILABLE


class DatabaseUnavailable(TransientError):
    reason = Reason.DATABASE_UNAVAILABLE


class BrokerUnavailable(TransientError):
    reason = Reason.BROKER_UNAVAILABLE


class ClaimedElsewhere(TransientError):
    """Another delivery holds the job's claim; try again once it may have ended."""

    reason = Reason.CLAIMED_ELSEWHERE

    def __init__(self, message: str, *, retry_in_ms: int) -> None:
        super().__init__(message)
        self.retry_in_ms = retry_in_ms


class DeliveryDeferred(SmtpTemporaryFailure):
    """An attempt left customer-facing recipients (or an internal copy) to try again later.
    The ledger already holds each recipient's state and when the next attempt is due."""


class OutcomeUnrecorded(TransientError):
    """The SMTP server answered but the ledger could not be written.

    ``outcome`` travels with the requeued message so the next delivery records
    it without talking to the SMTP server again.
    """

    reason = Reason.LEDGER_UNAVAILABLE

    def __init__(self, message: str, *, outcome: dict[str, Any]) -> None:
        super().__init__(message)
        self.outcome = outcome


class Throttled(PostboteError):
    """The tenant's series limit allows no slot within ``max_wait_ms``.

    Neither transient nor permanent: not a failure at all. The caller defers the
    job by ``retry_in_ms`` without counting a retry.
    """

    reason = Reason.THROTTLED

    def __init__(self, tenant_id: str, retry_in_ms: int) -> None:
        super().__init__(f"tenant {tenant_id!r} is throttled; retry in {retry_in_ms} ms")
        self.tenant_id = tenant_id
        self.retry_in_ms = retry_in_ms


class MustWait(PostboteError):
    """The job may not go out now, and that is no failure: the pipeline parks it in PostgreSQL
    with ``reason`` and ``status`` (``held`` or ``scheduled``, or ``retrying`` for a series
    wait), acknowledges the message and republishes it when due (``wait_ms``; ``None`` until
    something releases it). No attempt is used.
    """

    def __init__(self, message: str, *, reason: Reason, status: str, wait_ms: int | None) -> None:
        super().__init__(message, reason=reason)
        self.status = status
        self.wait_ms = wait_ms


class InternalError(PermanentError):
    """Something no stage foresaw (a bug, or an input nothing checked): the job is recorded and
    dead-lettered with the exception, for a replay once the cause is fixed."""

    reason = Reason.INTERNAL_ERROR


class InvalidJob(PermanentError):
    reason = Reason.INVALID_JOB


class JobIdConflict(InvalidJob):
    """The job id is known with another payload: the original job's records stay untouched."""

    reason = Reason.JOB_ID_CONFLICT


class CrashLoop(PermanentError):
    """Deliveries of the job keep ending with their worker dying."""

    reason = Reason.CRASH_LOOP


class UnknownTenant(PermanentError):
    reason = Reason.UNKNOWN_TENANT


class UnknownUser(PermanentError):
    reason = Reason.UNKNOWN_USER


class PublisherNotPermitted(PermanentError):
    """The message's publisher (its RabbitMQ ``user_id``) is not among the tenant's ``publishers``."""

    reason = Reason.PUBLISHER_NOT_PERMITTED


class SenderNotPermitted(PermanentError):
    reason = Reason.SENDER_NOT_PERMITTED

    def __init__(self, message: str, *, sender: str) -> None:
        super().__init__(message)
        self.sender = sender
        """The address the user may not send with."""


class ConfigurationError(PermanentError):
    reason = Reason.CONFIGURATION


class OAuthTokenInvalid(ConfigurationError):
    """What the token source gave is not one bearer token."""

    reason = Reason.OAUTH_TOKEN_INVALID


class DkimFailed(PermanentError):
    reason = Reason.DKIM_FAILED


class SmtpRejected(PermanentError):
    reason = Reason.SMTP_REJECTED


class RecipientsRefused(SmtpRejected):
    """Every recipient of an attempt was refused for good."""

    reason = Reason.RECIPIENTS_REFUSED


class DeliveryFailed(SmtpRejected):
    """An attempt's verdict: no customer-facing recipient got the mail, for good.
    The ledger already holds each recipient's state and reply."""


class Smtputf8Unsupported(SmtpRejected):
    reason = Reason.SMTPUTF8_UNSUPPORTED


class StartTlsUnavailable(SmtpRejected):
    reason = Reason.STARTTLS_UNAVAILABLE


class TlsVerifyFailed(SmtpRejected):
    reason = Reason.TLS_VERIFY_FAILED


class SmtpAuthFailed(SmtpRejected):
    """The server refused the login."""

    reason = Reason.SMTP_AUTH_FAILED


class SmtpAuthUnavailable(SmtpAuthFailed):
    """The server offers no login that postbote may use (no AUTH, or not the mechanism)."""

    reason = Reason.SMTP_AUTH_UNAVAILABLE


__all__ = [
    "BrokerUnavailable",
    "ClaimedElsewhere",
    "ConfigurationError",
    "CrashLoop",
    "DatabaseUnavailable",
    "DeliveryDeferred",
    "DeliveryFailed",
    "DkimFailed",
    "InternalError",
    "InvalidJob",
    "JobIdConflict",
    "OAuthTokenInvalid",
    "OAuthTokenUnavailable",
    "OutcomeUnrecorded",
    "PermanentError",
    "PostboteError",
    "PublisherNotPermitted",
    "RecipientsRefused",
    "SenderNotPermitted",
    "SmtpAuthFailed",
    "SmtpAuthUnavailable",
    "SmtpConnectionError",
    "SmtpRejected",
    "SmtpTemporaryFailure",
    "SmtpTimeout",
    "Smtputf8Unsupported",
    "StartTlsUnavailable",
    "Throttled",
    "TlsVerifyFailed",
    "TransientError",
    "UnknownTenant",
    "UnknownUser",
]
