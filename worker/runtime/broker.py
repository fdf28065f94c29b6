"""The RabbitMQ broker as dramatiq sees it, and the queue declarations the producer shares."""

from __future__ import annotations

import threading

import pika.exceptions
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import Middleware, ShutdownNotifications, TimeLimit

from worker.library_internals import (
    RabbitmqConsumerBase,
    delivery_tag,
    set_pika_read_size,
    underlying_channel,
)
from worker.runtime.middleware import GiveUp, RetryPolicy
from worker.settings import Settings

# pika reads 4 KB per recv(): a job with its PDF (~40 KB) takes ten reads, each followed by a
# copy of the growing frame buffer. 64 KB reads cost a consumer ~95 µs per such message
# instead of ~125 µs; larger reads lose again to pika re-copying the rest of its buffer
# after every frame.
set_pika_read_size(64 * 1024)


class _BatchedAcks(RabbitmqConsumerBase):
    """dramatiq's RabbitMQ consumer with cheaper acknowledgements.

    dramatiq hands each ack to the consumer's connection thread on its own, and there
    ``BlockingChannel.basic_ack`` polls the socket until that one frame is written.
    Here the first message settled since the connection thread last ran wakes it; it
    then queues the frames of all messages settled meanwhile on the channel, and the
    consumer's own I/O loop, which runs continuously, writes them out together
    (``bench/consumer.py`` measures the CPU this saves per message).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._settled: list[tuple[int, bool]] = []
        self._settled_lock = threading.Lock()
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    def ack(self, message: MessageProxy) -> None:
        self._settle(message, acked=True)

    def nack(self, message: MessageProxy) -> None:
        self._settle(message, acked=False)

    def _settle(self, message: MessageProxy, *, acked: bool) -> None:
        tag = delivery_tag(message)
        try:
            self.known_tags.remove(tag)
        except KeyError:
            self.logger.warning("Failed to settle message %s: not in known tags.", message.message_id)
            return
        with self._settled_lock:
            self._settled.append((tag, acked))
            wake = len(self._settled) == 1
        if wake:
            try:
                self.connection.add_callback_threadsafe(self._send_settled)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
                raise ConnectionClosed(e) from None  # type: ignore[no-untyped-call]

    def _send_settled(self) -> None:
        with self._settled_lock:
            settled, self._settled = self._settled, []
        channel = underlying_channel(self.channel)
        for tag, acked in settled:
            if acked:
                channel.basic_ack(tag)
            else:
                channel.basic_nack(tag, requeue=False)


class _Broker(RabbitmqBroker):
    @property
    def consumer_class(self) -> type[RabbitmqConsumerBase]:
        return _BatchedAcks


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
    return _Broker(url=settings.broker_url, confirm_delivery=True, middleware=middleware)


__all__ = ["make_broker"]
