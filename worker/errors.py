"""One error hierarchy, split by whether a retry can help."""

from __future__ import annotations


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


class DatabaseUnavailable(TransientError):
    reason = "database_unavailable"


class BrokerUnavailable(TransientError):
    reason = "broker_unavailable"


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


class SmtpRejected(PermanentError):
    reason = "smtp_rejected"


class ConfigurationError(PermanentError):
    reason = "configuration"


__all__ = [
    "BrokerUnavailable",
    "ConfigurationError",
    "DatabaseUnavailable",
    "InvalidJob",
    "PermanentError",
    "PostboteError",
    "SenderNotPermitted",
    "SmtpConnectionError",
    "SmtpRejected",
    "SmtpTemporaryFailure",
    "TransientError",
    "UnknownTenant",
    "UnknownUser",
]
