"""dramatiq's own metrics, written to the shared multiprocess files instead of a server of their own.

dramatiq's ``middleware.prometheus`` forks an HTTP server and keeps its files in
a fixed directory; the supervisor already serves ``/metrics`` for every process,
so this middleware records the same series (same names and labels) through
``worker.runtime.metrics``. It also tells the supervisor, per lane, how old the newest
message a worker started was when it was enqueued (see ``worker.runtime.queue_gauges``).
"""

from __future__ import annotations

import time
from typing import Any

from dramatiq import Broker
from dramatiq.broker import MessageProxy
from dramatiq.message import Message
from dramatiq.middleware import Middleware

from schemas.constants import LANES, queue_name
from worker.runtime import metrics
from worker.runtime.queue_gauges import StartedMarks


class Metrics(Middleware):
    """Counts processed, failed, retried and rejected messages, and times them, by queue and actor.

    Parameters:
      prefix: the queue prefix, to tell which lane a message belongs to.
      started: where to record the enqueue time of each started message; ``None`` records nothing.
    """

    def __init__(self, prefix: str, started: StartedMarks | None = None) -> None:
        self._lanes = {queue_name(prefix, lane): lane for lane in LANES}
        self._started = started
        self._start_times: dict[str, float] = {}
        self._delayed: set[str] = set()

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        metrics.DRAMATIQ_MESSAGE_REJECTS.labels(message.queue_name, message.actor_name).inc()

    def after_enqueue(self, broker: Broker, message: Message[Any], delay: int) -> None:
        if "retries" in message.options:
            metrics.DRAMATIQ_MESSAGE_RETRIES.labels(message.queue_name, message.actor_name).inc()

    def before_delay_message(self, broker: Broker, message: MessageProxy) -> None:
        self._delayed.add(message.message_id)
        metrics.DRAMATIQ_DELAYED_MESSAGES_IN_PROGRESS.labels(message.queue_name, message.actor_name).inc()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        labels = (message.queue_name, message.actor_name)
        if message.message_id in self._delayed:
            self._delayed.discard(message.message_id)
            metrics.DRAMATIQ_DELAYED_MESSAGES_IN_PROGRESS.labels(*labels).dec()
        metrics.DRAMATIQ_MESSAGES_IN_PROGRESS.labels(*labels).inc()
        self._start_times[message.message_id] = time.monotonic()
        lane = self._lanes.get(message.queue_name)
        if self._started is not None and lane is not None:
            self._started.record(lane, message.message_timestamp / 1000)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        labels = (message.queue_name, message.actor_name)
        started = self._start_times.pop(message.message_id, None)
        # A message skipped by an earlier middleware never reached before_process_message here.
        if started is not None:
            metrics.DRAMATIQ_MESSAGE_DURATION.labels(*labels).observe((time.monotonic() - started) * 1000)
            metrics.DRAMATIQ_MESSAGES_IN_PROGRESS.labels(*labels).dec()
        metrics.DRAMATIQ_MESSAGES.labels(*labels).inc()
        if exception is not None:
            metrics.DRAMATIQ_MESSAGE_ERRORS.labels(*labels).inc()

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self.after_process_message(broker, message)


__all__ = ["Metrics"]
