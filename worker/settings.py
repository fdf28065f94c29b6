"""The one settings object, read from ``POSTBOTE_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.constants import DEFAULT_MAX_JOB_BYTES

MAX_BACKOFF_LIMIT_MS = 15 * 60 * 1000
"""Half of RabbitMQ's default ``consumer_timeout`` (30 minutes)."""


class Settings(BaseSettings):
    """Runtime configuration. Built once by the CLI and passed to whoever needs it."""

    model_config = SettingsConfigDict(env_prefix="POSTBOTE_", extra="ignore")

    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postbote"
    metrics_port: int = 9191
    queue_prefix: str = Field("postbote", pattern=r"^[A-Za-z0-9_.-]*$")
    log_format: Literal["text", "json"] = "text"

    max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
    settings_cache_ms: int = Field(5000, ge=0)
    smtp_timeout_ms: int = Field(30000, gt=0)
    shutdown_grace_ms: int = Field(60000, gt=0)
    series_lease_ms: int = Field(90000, gt=0)
    series_max_wait_ms: int = Field(10000, ge=0)
    queue_stats_interval_ms: int = Field(15000, gt=0)

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

    @model_validator(mode="after")
    def _backoff_order(self) -> Settings:
        if self.min_backoff_ms > self.max_backoff_ms:
            raise ValueError("min_backoff_ms must not be larger than max_backoff_ms")
        return self


__all__ = ["MAX_BACKOFF_LIMIT_MS", "Settings"]
