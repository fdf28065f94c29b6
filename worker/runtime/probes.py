"""Reachability checks of the broker and the database, for ``/readyz`` and ``postbote check``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pika
import pika.exceptions

from worker.db import connect
from worker.errors import DatabaseUnavailable


def broker_parameters(broker_url: str, *, timeout_s: float | None = None) -> list[pika.URLParameters]:
    """The connection parameters of each RabbitMQ node in ``broker_url`` (AMQP URLs separated by
    ``;``, dramatiq's convention), tried in order; with ``timeout_s``, one attempt per node, each
    bounded by it."""
    nodes = []
    for url in (u.strip() for u in broker_url.split(";")):
        if not url:
            continue
        params = pika.URLParameters(url)
        if timeout_s is not None:
            params.socket_timeout = timeout_s
            params.stack_timeout = timeout_s
            params.blocked_connection_timeout = timeout_s
            params.connection_attempts = 1
        nodes.append(params)
    return nodes


def check_broker(broker_url: str) -> str | None:
    """``None`` when RabbitMQ answers, else what is wrong (without credentials)."""
    nodes = broker_parameters(broker_url, timeout_s=3)
    where = ", ".join(f"{p.host}:{p.port}" for p in nodes)
    try:
        pika.BlockingConnection(nodes).close()
    except pika.exceptions.AMQPError as e:
        return f"RabbitMQ at {where} unreachable ({type(e).__name__})"
    except OSError as e:
        return f"RabbitMQ at {where} unreachable ({e.strerror or e})"
    return None


def check_database(database_url: str) -> str | None:
    """``None`` when PostgreSQL answers a query, else what is wrong."""
    try:
        with connect(database_url) as conn:
            conn.execute("SELECT 1")
    except DatabaseUnavailable as e:
        return str(e)
    return None


class SharedProbe:
    """Runs ``check`` at most once per ``max_age_s`` and never twice at once.

    Any number of concurrent ``/readyz`` requests thus opens one connection to each service.
    Callers arriving while the first check runs wait for its result; later, while a check
    runs, they get the previous one at once (no request thread waits for a slow service but
    the one checking).

    Parameters:
      check: the probe; returns the problems found (empty when all is well).
      max_age_s: how long a result is handed out before the next caller checks again.
      clock: monotonic seconds, replaceable in tests.
    """

    def __init__(
        self,
        check: Callable[[], list[str]],
        *,
        max_age_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._result: list[str] = []
        self._checked_at: float | None = None

    def problems(self) -> list[str]:
        """The problems of the latest check, checking again if it is older than ``max_age_s``."""
        if not self._fresh() and self._lock.acquire(blocking=self._checked_at is None):
            try:
                if not self._fresh():
                    try:
                        self._result = list(self._check())
                    except Exception as e:  # a probe that breaks says so instead of failing the request
                        self._result = [f"the readiness check failed ({type(e).__name__})"]
                    self._checked_at = self._clock()
            finally:
                self._lock.release()
        return list(self._result)

    def _fresh(self) -> bool:
        return self._checked_at is not None and self._clock() - self._checked_at < self._max_age_s


def service_problems(broker_url: str, database_url: str) -> list[str]:
    """What ``check_broker`` and ``check_database`` report, in that order."""
    return [p for p in (check_broker(broker_url), check_database(database_url)) if p]


__all__ = ["SharedProbe", "broker_parameters", "check_broker", "check_database", "service_problems"]
