"""The words postbote records and reports: job statuses, recipient roles and states, failure
reasons, log outcomes. The ledger, the dead-letter store, the metrics and the logs take their
values from here; SQL binds them as parameters."""

from __future__ import annotations

from enum import StrEnum

from schemas.event import EventType


class Status(StrEnum):
    """A job's status in the delivery ledger."""

    SENDING = "sending"
    """Claimed by a worker; SMTP under way."""
    RETRYING = "retrying"
    """A later attempt is due (``next_attempt_at``)."""
    HELD = "held"
    """Parked in PostgreSQL until an operator or the cause releases it (a pause, a suppressed
    address, a failing login)."""
    SCHEDULED = "scheduled"
    """Parked until its ``not_before``."""
    SENT = "sent"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    """Not sent by its ``expires_at``."""

    @property
    def final(self) -> bool:
        return self in FINAL

    @property
    def delivered(self) -> bool:
        """Some customer-facing recipient has the mail."""
        return self in DELIVERED


FINAL = frozenset({Status.SENT, Status.PARTIAL, Status.FAILED, Status.CANCELLED, Status.EXPIRED})
DELIVERED = frozenset({Status.SENT, Status.PARTIAL})


class Role(StrEnum):
    """Why an address is in the envelope."""

    TO = "to"
    CC = "cc"
    BCC = "bcc"
    CLERK = "clerk"
    ARCHIVE = "archive"

    @property
    def customer_facing(self) -> bool:
        return self in CUSTOMER_FACING


CUSTOMER_FACING = frozenset({Role.TO, Role.CC, Role.BCC})


class RecipientState(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    BOUNCED = "bounced"
    """Accepted, then reported undeliverable by a bounce."""
    SUPPRESSED = "suppressed"
    """Not tried: the address is on the tenant's suppression list."""


class Reason(StrEnum):
    """Why a job failed, waits or was dead-lettered: the ``reason`` in the ledger, the dead-letter
    store, the metric labels and the logs."""

    ERROR = "error"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    INTERNAL_ERROR = "internal_error"
    # the job itself
    INVALID_JOB = "invalid_job"
    NOT_A_JOB = "not_a_job"
    MALFORMED_JSON = "malformed_json"
    TOO_LARGE = "too_large"
    NOT_A_DRAMATIQ_MESSAGE = "not_a_dramatiq_message"
    UNKNOWN_ACTOR = "unknown_actor"
    REJECTED_BY_WORKER = "rejected_by_worker"
    JOB_ID_CONFLICT = "job_id_conflict"
    UNKNOWN_TENANT = "unknown_tenant"
    UNKNOWN_USER = "unknown_user"
    SENDER_NOT_PERMITTED = "sender_not_permitted"
    PUBLISHER_NOT_PERMITTED = "publisher_not_permitted"
    CONFIGURATION = "configuration"
    DKIM_FAILED = "dkim_failed"
    # SMTP
    SMTP_TEMPORARY = "smtp_temporary"
    SMTP_CONNECTION = "smtp_connection"
    SMTP_TIMEOUT = "smtp_timeout"
    SMTP_REJECTED = "smtp_rejected"
    RECIPIENTS_REFUSED = "recipients_refused"
    SMTPUTF8_UNSUPPORTED = "smtputf8_unsupported"
    STARTTLS_UNAVAILABLE = "starttls_unavailable"
    TLS_VERIFY_FAILED = "tls_verify_failed"
    SMTP_AUTH_FAILED = "smtp_auth_failed"
    SMTP_AUTH_UNAVAILABLE = "smtp_auth_unavailable"
    OAUTH_TOKEN_UNAVAILABLE = "oauth_token_unavailable"
    OAUTH_TOKEN_INVALID = "oauth_token_invalid"
    # our own infrastructure and the retry policy
    DATABASE_UNAVAILABLE = "database_unavailable"
    BROKER_UNAVAILABLE = "broker_unavailable"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    CLAIMED_ELSEWHERE = "claimed_elsewhere"
    CRASH_LOOP = "crash_loop"
    MAX_AGE_EXCEEDED = "max_age_exceeded"
    THROTTLED = "throttled"
    REPLAYED = "replayed"
    # operator control and parking
    PAUSED = "paused"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    SCHEDULED = "scheduled"
    SERIES = "series"
    """Parked: the tenant's next series slot is further away than a consumer should wait."""
    BOUNCED = "bounced"
    SUPPRESSED = "suppressed"
    LOGIN_FAILING = "login_failing"
    """Held: the tenant's SMTP login or TLS verification failed recently (circuit breaker)."""
    UNSTORABLE = "unstorable"
    """Named in a dead-letter entry's detail (the entry keeps the reason the job died for):
    PostgreSQL refused the message as JSON, so it is kept as raw bytes."""


class LogOutcome(StrEnum):
    """The ``outcome`` of a job's log line."""

    SENT = "sent"
    PARTIAL = "partial"
    FAILED = "failed"
    RETRYING = "retrying"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    PARKED = "parked"
    STOPPED = "stopped"
    """The last check before DATA found the job ended or claimed by another worker."""
    DUPLICATE_PREVENTED = "duplicate_prevented"


__all__ = [
    "CUSTOMER_FACING",
    "DELIVERED",
    "FINAL",
    "EventType",
    "LogOutcome",
    "Reason",
    "RecipientState",
    "Role",
    "Status",
]
