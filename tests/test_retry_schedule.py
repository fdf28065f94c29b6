"""The retry schedule: exponential, jittered, capped, and never near RabbitMQ's consumer timeout."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from worker.runtime.middleware import backoff_ms
from worker.settings import MAX_BACKOFF_LIMIT_MS, Settings


def test_each_retry_waits_between_half_and_all_of_a_doubling_delay() -> None:
    rng = random.Random(5)
    for requeues in range(6):
        base = 5000 * 2**requeues
        delays = [backoff_ms(requeues, min_ms=5000, max_ms=300_000, rng=rng) for _ in range(200)]
        assert base / 2 <= min(delays) and max(delays) <= base
        assert len(set(delays)) > 100, "jitter spreads retries of jobs that failed together"


def test_the_delay_never_exceeds_the_maximum_backoff() -> None:
    assert max(backoff_ms(40, min_ms=5000, max_ms=300_000) for _ in range(100)) <= 300_000


def test_the_default_schedule_gives_up_within_about_ten_minutes() -> None:
    defaults = Settings()
    worst = sum(
        min(defaults.max_backoff_ms, defaults.min_backoff_ms * 2**n) for n in range(defaults.max_attempts - 1)
    )
    assert worst <= 11 * 60_000


def test_a_maximum_backoff_near_rabbitmqs_consumer_timeout_is_refused() -> None:
    assert MAX_BACKOFF_LIMIT_MS <= 30 * 60_000 / 2
    with pytest.raises(ValidationError, match="max_backoff_ms"):
        Settings(max_backoff_ms=25 * 60_000)


def test_the_minimum_backoff_may_not_exceed_the_maximum() -> None:
    with pytest.raises(ValidationError, match="min_backoff_ms must not be larger"):
        Settings(min_backoff_ms=10_000, max_backoff_ms=5_000)
