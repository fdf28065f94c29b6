"""The supervisor's housekeeping thread: retention every hour, the failing-login gauge every few seconds.

``postbote_login_failing{tenant,reason}`` is 1 for each tenant whose login breaker is open
(:mod:`worker.job.breaker`). It is read from PostgreSQL, so every host shows every tenant
whose login fails anywhere; the alert takes ``max by (tenant)``. A scrape never waits for
the database: it gets the last reading.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from schemas import constants as names
from worker.db import connect
from worker.errors import DatabaseUnavailable
from worker.job.breaker import FailingLogin, failing_logins
from worker.runtime.retention import run_retention
from worker.settings import Settings

logger = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 3600.0


class Housekeeping:
    """A Prometheus collector of ``postbote_login_failing`` and the loop that refreshes it and
    runs retention (``run``, in one supervised thread)."""

    def __init__(self, settings: Settings, *, retention_interval_s: float = RETENTION_INTERVAL_S) -> None:
        self._settings = settings
        self._retention_interval_s = retention_interval_s
        self._failing: list[FailingLogin] = []

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set; outages are logged and outlasted, anything else propagates."""
        interval_s = self._settings.queue_stats_interval_ms / 1000
        next_retention = time.monotonic() + min(60.0, self._retention_interval_s)
        while not stop.is_set():
            try:
                with connect(self._settings.database_url, autocommit=True) as conn:
                    self._failing = failing_logins(conn)
                    if time.monotonic() >= next_retention:
                        next_retention = time.monotonic() + self._retention_interval_s
                        report = run_retention(conn, self._settings)
                        if report.total:
                            logger.info("retention removed the personal data of %s", report.counts)
            except DatabaseUnavailable as e:
                logger.info("housekeeping skipped: %s", e)
            stop.wait(interval_s)

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            names.METRIC_LOGIN_FAILING,
            "1 while the tenant's SMTP login (or the server certificate's verification) fails:"
            " its jobs are held (login_failing) and one tries again now and then.",
            labels=["tenant", "reason"],
        )
        for failing in self._failing:
            gauge.add_metric([failing.tenant, failing.reason], 1)
        yield gauge


__all__ = ["RETENTION_INTERVAL_S", "Housekeeping"]
