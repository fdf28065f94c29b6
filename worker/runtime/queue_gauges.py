"""``postbote_queue_messages`` and ``postbote_queue_oldest_age_seconds``, computed in one place.

The supervisor of each ``postbote worker`` refreshes them on a timer
(``queue_stats_interval_ms``) and serves the last reading at every scrape, so a
queue is counted once per host however many processes run, and a scrape never
waits for RabbitMQ or PostgreSQL.

Queues: ``documents`` and ``receipts`` (the RabbitMQ work queues, ready
messages) and ``dead`` (the dead-letter store in PostgreSQL). From PostgreSQL too:
``postbote_jobs_parked{tenant,reason}`` (jobs waiting in ``parked_jobs``) and
``postbote_tenant_paused_seconds{tenant}`` (how long the tenant's oldest pause has held).

The age of the oldest waiting RabbitMQ message cannot be read without taking
the message off the queue (``basic_get`` then requeue marks it redelivered and
briefly hides it from consumers; the management API's head timestamp needs the
plugin and an AMQP ``timestamp`` property that dramatiq's retries do not set).
So it is bounded from what is known instead. A queue is first in, first out,
hence every message still waiting was enqueued after

* the newest enqueue time among the messages a worker process of this host
  has started (``StartedMarks``, shared memory written by the middleware), and
* the last time this supervisor saw the queue empty (or its own start).

The gauge is ``now`` minus the later of the two: never less than the true age
of the oldest message, and close to it while workers take messages off the
queue. It is 0 when nothing waits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.context import BaseContext
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from schemas import constants as names
from schemas.constants import LANES, queue_name
from worker.db import connect
from worker.errors import BrokerUnavailable, DatabaseUnavailable
from worker.job.directives import active_pauses
from worker.job.parking import parked_counts
from worker.runtime.queue_depth import count_ready, read_dead_letters
from worker.settings import Settings

logger = logging.getLogger(__name__)


class StartedMarks:
    """Per lane, the enqueue time of the newest message any worker process has started.

    Lives in shared memory created by the supervisor and handed to each spawned process.
    """

    def __init__(self, context: BaseContext) -> None:
        self._times: Any = context.Array("d", len(LANES))

    def record(self, lane: str, enqueued_at: float) -> None:
        """Remember ``enqueued_at`` (Unix seconds) if it is the newest seen for ``lane``."""
        index = LANES.index(lane)
        with self._times.get_lock():
            if enqueued_at > self._times[index]:
                self._times[index] = enqueued_at

    def newest(self, lane: str) -> float | None:
        """The newest enqueue time recorded for ``lane``, ``None`` before any message started."""
        value = float(self._times[LANES.index(lane)])
        return value or None


def oldest_age(waiting: int, *, newest_started: float | None, last_seen_empty: float, now: float) -> float:
    """An upper bound of the oldest waiting message's age, in seconds (see the module docstring)."""
    if waiting == 0:
        return 0.0
    return max(0.0, now - max(newest_started or 0.0, last_seen_empty))


class QueueGauges:
    """A Prometheus collector of the queue gauges, refreshed by ``run`` in one thread.

    Parameters:
      settings: broker and database to read, queue prefix, refresh interval.
      started: what the worker processes of this host started.
      clock: Unix time, replaceable in tests.
    """

    def __init__(
        self, settings: Settings, started: StartedMarks, clock: Callable[[], float] = time.time
    ) -> None:
        self._settings = settings
        self._started = started
        self._clock = clock
        self._last_empty = dict.fromkeys(LANES, clock())
        self._readings: dict[str, tuple[int, float]] = {}
        self._parked: list[tuple[str, str, int]] = []
        self._paused: dict[str, float] = {}
        self._problems: dict[str, str] = {}

    def refresh(self) -> None:
        """Read the queues once. A source that cannot be read drops its series until it can again."""
        readings: dict[str, tuple[int, float]] = {}
        try:
            queues = {lane: queue_name(self._settings.queue_prefix, lane) for lane in LANES}
            counts = count_ready(self._settings.broker_url, list(queues.values()))
        except BrokerUnavailable as e:
            self._report("broker", str(e))
        else:
            self._report("broker", None)
            now = self._clock()
            for lane, queue in queues.items():
                waiting = counts[queue]
                if waiting == 0:
                    self._last_empty[lane] = now
                age = oldest_age(
                    waiting,
                    newest_started=self._started.newest(lane),
                    last_seen_empty=self._last_empty[lane],
                    now=now,
                )
                readings[lane] = (waiting, age)
        try:
            with connect(self._settings.database_url) as conn:
                dead = read_dead_letters(conn)
                self._parked = parked_counts(conn)
                paused: dict[str, float] = {}
                now = self._clock()
                for row in active_pauses(conn):
                    since = now - row["created_at"].timestamp()
                    paused[row["tenant"]] = max(paused.get(row["tenant"], 0.0), since)
                self._paused = paused
        except DatabaseUnavailable as e:
            self._report("database", str(e))
        else:
            self._report("database", None)
            readings[names.DEAD_LETTER_QUEUE_LABEL] = (dead.count, dead.oldest_age_s)
        self._readings = readings

    def run(self, stop: threading.Event) -> None:
        """Refresh every ``queue_stats_interval_ms`` until ``stop`` is set."""
        while True:
            self.refresh()
            if stop.wait(self._settings.queue_stats_interval_ms / 1000):
                return

    def collect(self) -> Iterator[Metric]:
        """The last reading, for the ``/metrics`` registry."""
        messages = GaugeMetricFamily(
            names.METRIC_QUEUE_MESSAGES,
            "Messages waiting, per queue (dead = the dead-letter store).",
            labels=["queue"],
        )
        ages = GaugeMetricFamily(
            names.METRIC_QUEUE_OLDEST_AGE_SECONDS,
            "Age of the oldest waiting message per queue (an upper bound for the work queues).",
            labels=["queue"],
        )
        for queue, (count, age) in sorted(self._readings.items()):
            messages.add_metric([queue], count)
            ages.add_metric([queue], age)
        yield messages
        yield ages
        parked = GaugeMetricFamily(
            names.METRIC_JOBS_PARKED,
            "Jobs parked in PostgreSQL until due or released, per tenant and reason.",
            labels=["tenant", "reason"],
        )
        for tenant, reason, count in sorted(self._parked):
            parked.add_metric([tenant, reason], count)
        yield parked
        paused = GaugeMetricFamily(
            names.METRIC_TENANT_PAUSED_SECONDS,
            "How long the tenant's oldest pause in force has lasted.",
            labels=["tenant"],
        )
        for tenant, seconds in sorted(self._paused.items()):
            paused.add_metric([tenant], seconds)
        yield paused

    def _report(self, source: str, problem: str | None) -> None:
        """Log when reading a source starts or stops failing, not at every refresh."""
        previous = self._problems.pop(source, None)
        if problem is not None:
            self._problems[source] = problem
            if problem != previous:
                logger.warning("queue gauges: cannot read the %s: %s", source, problem)
        elif previous is not None:
            logger.info("queue gauges: the %s can be read again", source)


__all__ = ["QueueGauges", "StartedMarks", "oldest_age"]
