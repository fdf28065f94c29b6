"""The RabbitMQ broker as dramatiq sees it, and the queue declarations the producer shares."""

from __future__ import annotations

from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware, ShutdownNotifications, TimeLimit
from pika.adapters.utils.io_services_utils import _AsyncTransportBase

from worker.middleware import GiveUp, RetryPolicy
from worker.settings import Settings

# pika reads 4 KB per recv(): a job with its PDF (~40 KB) takes ten reads, each followed by a
# copy of the growing frame buffer. 64 KB reads cost a consumer ~95 µs per such message
# instead of ~125 µs; larger reads lose again to pika re-copying the rest of its buffer
# after every frame.
_AsyncTransportBase._MAX_RECV_BYTES = 64 * 1024


def make_broker(settings: Settings, give_up: GiveUp, extra: list[Middleware] | None = None) -> RabbitmqBroker:
    """A confirm-delivery RabbitMQ broker whose retry policy dead-letters through ``give_up``.

    Permanent errors never reach the retry policy: the actor records and
    dead-letters them itself. Transient ones are retried with exponential
    backoff and jitter, capped at ``max_backoff_ms`` so a delayed retry is never
    held unacknowledged anywhere near RabbitMQ's 30-minute consumer timeout.
    dramatiq's own ``Retries`` is deliberately absent (see ``RetryPolicy``).
    """
    middleware: list[Middleware] = [
        TimeLimit(time_limit=max(10 * settings.smtp_timeout_ms, 600_000)),
        ShutdownNotifications(),
        RetryPolicy(settings, give_up),
        *(extra or []),
    ]
    return RabbitmqBroker(url=settings.broker_url, confirm_delivery=True, middleware=middleware)


__all__ = ["make_broker"]
