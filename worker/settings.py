"""The one settings object, read from ``POSTBOTE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.constants import DEFAULT_MAX_JOB_BYTES

MAX_BACKOFF_LIMIT_MS = 15 * 60 * 1000
"""Half of RabbitMQ's default ``consumer_timeout`` (30 minutes)."""
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
"""The default of ``Settings.statement_timeout_ms``."""


class Settings(BaseSettings):
    """Runtime configuration. Built once by the CLI and passed to whoever needs it."""

    model_config = SettingsConfigDict(env_prefix="POSTBOTE_", extra="ignore")

    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postbote"
    metrics_host: str = "0.0.0.0"
    """The address ``/metrics``, ``/healthz`` and ``/readyz`` listen on (``0.0.0.0``: every IPv4
    interface, which containers need; ``127.0.0.1`` keeps them on the host)."""
    metrics_port: int = 9191
    queue_prefix: str = Field("postbote", pattern=r"^[A-Za-z0-9_.-]*$")
    queue_type: Literal["classic", "quorum"] = "classic"
    """The RabbitMQ type postbote declares its queues with: ``quorum`` replicates them over a
    majority of a cluster's nodes (docs/high-availability.md); every worker and producer of an
    installation must name the same type, and ``postbote queues migrate`` changes it."""
    log_format: Literal["text", "json"] = "text"

    max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
    settings_cache_ms: int = Field(5000, ge=0)
    smtp_timeout_ms: int = Field(30000, gt=0)
    statement_timeout_ms: int = Field(DEFAULT_STATEMENT_TIMEOUT_MS, ge=0)
    """PostgreSQL's ``statement_timeout`` on postbote's connections, so a server that hangs
    cannot hold worker threads; a cancelled statement counts as an outage. 0: none sent."""
    shutdown_grace_ms: int = Field(60000, gt=0)
    series_lease_ms: int = Field(90000, gt=0)
    series_max_wait_ms: int = Field(10000, ge=0)
    series_park_after_ms: int = Field(1000, ge=0)
    """A bulk job whose series slot is further away than this is parked in PostgreSQL (and
    republished about this long before the slot) instead of waiting in a worker thread."""
    tenant_threads: int = Field(0, ge=0)
    """The most bulk threads of a worker process one throttled tenant's jobs may hold at once
    while they wait for their series slot; the others are parked. 0: half the bulk threads."""
    release_interval_ms: int = Field(500, gt=0)
    """How often the supervisor republishes parked jobs that are due."""
    queue_stats_interval_ms: int = Field(15000, gt=0)
    delay_prefetch: int = Field(100, ge=1)
    """Delayed messages (retries, deferrals) each lane's ``.DQ`` consumer holds until they are
    due; the rest wait in RabbitMQ. It bounds that consumer's memory to this many times
    ``max_message_bytes`` (dramatiq's default, 1000 per thread, does not)."""

    max_attempts: int = Field(8, ge=1)
    """Deliveries of a job that may fail before it is dead-lettered (outages of our own
    database or broker and waits for another worker's claim do not count)."""
    min_backoff_ms: int = Field(5000, gt=0)
    max_backoff_ms: int = Field(300000, gt=0, le=MAX_BACKOFF_LIMIT_MS)
    """A delayed retry is held unacknowledged by the consumer until it is due, so this
    stays far below RabbitMQ's 30-minute consumer timeout."""
    max_age_ms: int = Field(24 * 3600 * 1000, gt=0)
    """A job that failed and was first published longer ago than this is dead-lettered
    with reason ``max_age_exceeded`` instead of being retried."""
    crash_loop_after: int = Field(3, ge=1)
    """A job whose deliveries ended with the worker dying this many times is dead-lettered
    with reason ``crash_loop``."""
    restart_backoff_max_ms: int = Field(30000, gt=0)
    """The longest wait before the supervisor restarts a worker process or one of its threads
    that died (the wait starts at 500 ms and doubles with every death in a row)."""
    restart_reset_ms: int = Field(60000, gt=0)
    """A worker process or thread that ran this long counts as healthy again: its deaths in a
    row are forgotten (the next restart waits 500 ms, ``/healthz`` stops reporting a crash loop)."""
    events_retention_days: int = Field(14, ge=0)
    """Published delivery events older than this are deleted from the outbox (the ``events``
    table), a few thousand at a time; ``postbote events tail`` and ``replay`` reach back this
    far. 0 keeps them forever."""

    secrets_key_file: Path | None = None
    """The key ring that seals inline secrets (``password``, ``private_key``) in the database:
    one key per line, the first seals, all unseal (``postbote secrets keygen``). Without it,
    inline secrets are refused."""
    secrets_dir: str | None = None
    """Every ``*_file`` path of a tenant file must resolve inside this directory; ``{tenant}`` in
    it stands for the tenant's id (one directory per tenant). Without it, ``*_file`` paths are refused."""
    token_helpers: dict[str, str] = {}
    """Token commands by name (JSON object), the only commands a tenant's ``token_helper`` may
    name; run without the worker's environment, with a timeout and an output limit."""
    token_helper_timeout_ms: int = Field(30000, gt=0)
    retention_days: int = Field(30, ge=0)
    """Bodies, attachments and addresses of jobs that ended longer ago are removed from the ledger
    and the outbox (ids, tenant, document, status, reason and times stay). 0 keeps them forever."""
    dead_letter_retention_days: int = Field(90, ge=0)
    """The same for dead-letter entries (until then ``postbote dlq replay`` can send them). 0:
    kept until purged."""
    login_hold_ms: int = Field(300000, gt=0)
    """After a refused login or a certificate that does not verify, a tenant's jobs wait this long
    (held, ``login_failing``) before one of them tries again."""

    webhook_retry_hours: float = Field(24, gt=0)
    """How long a webhook's refused event is retried (from its first failed attempt) before it is
    kept as a failed delivery for ``postbote events webhooks --resend`` and the next one is sent."""
    webhook_min_backoff_ms: int = Field(5000, gt=0)
    """The first wait before a refused webhook event is posted again; it doubles with every try."""
    webhook_max_backoff_ms: int = Field(30 * 60 * 1000, gt=0)
    """The longest wait between two tries of a refused webhook event."""
    webhook_timeout_ms: int = Field(10000, gt=0)
    """How long one webhook POST may take to connect, and then to answer."""

    @property
    def max_message_bytes(self) -> int:
        """The largest message body a worker reads: a job of ``max_job_bytes`` (attachments
        counted decoded) in base64, plus 64 KiB for the envelope. A larger body is rejected
        unread, into the lane's ``.XQ`` queue."""
        return self.max_job_bytes * 4 // 3 + 64 * 1024

    @model_validator(mode="after")
    def _backoff_order(self) -> Settings:
        if self.min_backoff_ms > self.max_backoff_ms:
            raise ValueError("min_backoff_ms must not be larger than max_backoff_ms")
        return self


__all__ = ["DEFAULT_STATEMENT_TIMEOUT_MS", "MAX_BACKOFF_LIMIT_MS", "Settings"]
