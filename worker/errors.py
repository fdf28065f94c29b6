"""One error hierarchy, split by whether a retry can help."""

from __future__ import annotations

from typing import Any


class PostboteError(Exception):
    """Root of every error postbote raises on purpose."""

    reason = "error"


class TransientError(PostboteError):
    """A retry may help: SMTP 4xx, timeouts, connection loss, database or broker outage."""

    reason = "transient"

    def __init__(self, message: str, *, reason: str | None = None, smtp_reply: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.smtp_reply = smtp_reply


class SmtpTemporaryFailure(TransientError):
    reason = "smtp_temporary"


class SmtpConnectionError(TransientError):
    reason = "smtp_connection"


class SmtpTimeout(SmtpConnectionError):
    """The server did not answer in time. After the final dot this is ambiguous: the
    server may have taken the mail, so a retry may deliver it twice (same Message-ID)."""

    reason = "smtp_timeout"


class DatabaseUnavailable(TransientError):
    reason = "database_unavailable"


class BrokerUnavailable(TransientError):
    reason = "broker_unavailable"


class ClaimedElsewhere(TransientError):
    """Another delivery holds the job's claim; try again once it may have ended."""

    reason = "claimed_elsewhere"

    def __init__(self, message: str, *, retry_in_ms: int) -> None:
        super().__init__(message)
        self.retry_in_ms = retry_in_ms


class DeliveryDeferred(SmtpTemporaryFailure):
    """An attempt left customer-facing recipients (or an internal copy) to try again later.
    The ledger already holds each recipient's state and when the next attempt is due."""


class OutcomeUnrecorded(TransientError):
    """The SMTP server took the mail but the ledger could not be written.

    ``outcome`` travels with the requeued message so the next delivery records
    it without talking to the SMTP server again.
    """

    reason = "ledger_unavailable"

    def __init__(self, message: str, *, outcome: dict[str, Any]) -> None:
        super().__init__(message)
        self.outcome = outcome


class PermanentError(PostboteError):
    """No retry can help; the job goes to the dead-letter queue at once with ``reason``."""

    reason = "permanent"

    def __init__(self, message: str, *, reason: str | None = None, smtp_reply: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.smtp_reply = smtp_reply


class InvalidJob(PermanentError):
    reason = "invalid_job"


class UnknownTenant(PermanentError):
    reason = "unknown_tenant"


class UnknownUser(PermanentError):
    reason = "unknown_user"


class SenderNotPermitted(PermanentError):
    reason = "sender_not_permitted"

    sender: str | None = None
    """The address the user may not send with."""


class SmtpRejected(PermanentError):
    reason = "smtp_rejected"


class DeliveryFailed(SmtpRejected):
    """An attempt's verdict: no customer-facing recipient got the mail, for good.
    The ledger already holds each recipient's state and reply."""


class ConfigurationError(PermanentError):
    reason = "configuration"


__all__ = [
    "BrokerUnavailable",
    "ClaimedElsewhere",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DeliveryDeferred",
    "DeliveryFailed",
    "InvalidJob",
    "OutcomeUnrecorded",
    "PermanentError",
    "PostboteError",
    "SenderNotPermitted",
    "SmtpConnectionError",
    "SmtpRejected",
    "SmtpTemporaryFailure",
    "SmtpTimeout",
    "TransientError",
    "UnknownTenant",
    "UnknownUser",
]
