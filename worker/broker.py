"""The RabbitMQ broker as dramatiq sees it, and the queue declarations the producer shares."""

from __future__ import annotations

from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware, Retries, ShutdownNotifications, TimeLimit

from worker.errors import TransientError
from worker.settings import Settings


def make_broker(settings: Settings, extra: list[Middleware] | None = None) -> RabbitmqBroker:
    """A confirm-delivery RabbitMQ broker with retries for transient errors only.

    Permanent errors never reach the retry middleware: the actor records and
    dead-letters them itself. Backoff is exponential with jitter and capped at
    ``max_backoff_ms``, so a delayed retry is never held unacknowledged anywhere
    near RabbitMQ's 30-minute consumer timeout.
    """

    def retry_when(retries: int, exception: BaseException) -> bool:
        return isinstance(exception, TransientError) and retries < settings.max_attempts - 1

    middleware: list[Middleware] = [
        TimeLimit(time_limit=max(10 * settings.smtp_timeout_ms, 600_000)),
        ShutdownNotifications(),
        Retries(
            retry_when=retry_when,
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
        ),
        *(extra or []),
    ]
    return RabbitmqBroker(url=settings.broker_url, confirm_delivery=True, middleware=middleware)


__all__ = ["make_broker"]
