"""Publishing delivery events to the durable topic exchange ``<prefix>.events``, confirmed.

A batch goes out with many messages in flight, and returns once RabbitMQ confirmed them; a
blocking channel in confirm mode would wait for one confirm after every message. The
connection (pika's asynchronous one, its I/O loop run only while a batch goes out or while
``keep_alive`` answers heartbeats) stays open between batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pika
import pika.exceptions
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic

from producer.confirms import confirmed_upto
from schemas.constants import events_exchange
from worker.errors import BrokerUnavailable
from worker.runtime.probes import broker_parameters

WINDOW = 1000
"""Messages in flight, not yet confirmed."""

CONNECT_TIMEOUT_S = 10.0

EventMessage = tuple[str, bytes, pika.BasicProperties]
"""Routing key, body and properties of one event."""


class EventPublisher:
    """A confirmed channel to the durable topic exchange ``<prefix>.events``, opened (and the
    exchange declared) on first use and kept open.

    Parameters:
      broker_url: one or more AMQP URLs separated by ``;``, tried in order.
      queue_prefix: ``POSTBOTE_QUEUE_PREFIX``.
      timeout_s: how long a batch may take before ``publish`` gives up on the rest.
    """

    def __init__(self, broker_url: str, queue_prefix: str, *, timeout_s: float = 10.0) -> None:
        self.exchange = events_exchange(queue_prefix)
        self._broker_url = broker_url
        self._timeout_s = timeout_s
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._error: str | None = None
        self._published = 0
        self._acked_upto = 0
        self._acked_beyond: set[int] = set()
        self._done: Callable[[], bool] = lambda: True

    def publish(self, messages: Sequence[EventMessage]) -> int:
        """Publish ``messages`` persistently, in order; returns how many of them, from the first,
        RabbitMQ confirmed within the time limit (all of them, unless the broker is slow).

        Raises:
          BrokerUnavailable: RabbitMQ cannot be reached, refused a message or closed the channel;
            the connection is closed, the next call opens a new one. Which messages of the batch
            arrived is unknown: publish them again.
        """
        with self._translated_errors():
            channel = self._open()
            first = self._published
            deadline = time.monotonic() + self._timeout_s
            for routing_key, body, properties in messages:
                channel.basic_publish(self.exchange, routing_key, body, properties)
                self._published += 1
                if self._published - self._acked_upto >= WINDOW:
                    self._run_until(self._published - WINDOW // 2, deadline)
            self._run_until(self._published, deadline)
        if self._error is not None:
            error = self._error
            self.close()
            raise BrokerUnavailable(f"cannot publish to {self.exchange}: {error}")
        return max(0, min(self._acked_upto, self._published) - first)

    def keep_alive(self) -> None:
        """Answer RabbitMQ's heartbeats while idle (an open connection only)."""
        connection = self._connection
        if connection is not None and connection.is_open:
            with self._translated_errors():
                connection.ioloop.call_later(0, connection.ioloop.stop)
                connection.ioloop.start()
            if self._error is not None:
                self.close()

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is None:
            return
        if not (connection.is_closed or connection.is_closing):
            try:
                connection.close()
                connection.ioloop.call_later(2.0, connection.ioloop.stop)
                connection.ioloop.start()
            except (pika.exceptions.AMQPError, OSError):
                pass
        connection.ioloop.close()

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except (pika.exceptions.AMQPError, OSError) as e:
            self.close()
            text = str(e).strip()
            described = f"{type(e).__name__}: {text}" if text else type(e).__name__
            raise BrokerUnavailable(f"cannot publish to {self.exchange}: {described}") from e

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> Channel:
        if self._channel is not None and self._channel.is_open and self._error is None:
            return self._channel
        self.close()
        problems = []
        for node in broker_parameters(self._broker_url, timeout_s=CONNECT_TIMEOUT_S):
            self._error = None
            self._published = self._acked_upto = 0
            self._acked_beyond.clear()
            self._connection = pika.SelectConnection(
                node,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_closed,
            )
            self._run(time.monotonic() + CONNECT_TIMEOUT_S + 1, lambda: self._channel is not None)
            if self._channel is not None and self._error is None:
                return self._channel
            problems.append(f"{node.host}:{node.port}: {self._error or 'no channel in time'}")
            self.close()
        raise BrokerUnavailable(f"cannot publish to {self.exchange}: {'; '.join(problems)}")

    def _run_until(self, acked: int, deadline: float) -> None:
        self._run(deadline, lambda: self._acked_upto >= acked)

    def _run(self, deadline: float, done: Callable[[], bool]) -> None:
        """Run the I/O loop until ``done()``, an error, or ``deadline``."""
        connection = self._connection
        assert connection is not None
        self._done = done
        if done() or self._error is not None:
            return
        timer = connection.ioloop.call_later(max(0.0, deadline - time.monotonic()), connection.ioloop.stop)
        try:
            while not done() and self._error is None and time.monotonic() < deadline:
                connection.ioloop.start()
        finally:
            connection.ioloop.remove_timeout(timer)
            self._done = lambda: True

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Channel) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        channel.confirm_delivery(
            ack_nack_callback=self._on_confirm,
            callback=lambda _: channel.exchange_declare(
                self.exchange,
                exchange_type="topic",
                durable=True,
                callback=lambda _: self._ready(channel),
            ),
        )

    def _ready(self, channel: Channel) -> None:
        self._channel = channel
        self._stop_when_done()

    def _on_confirm(self, frame: Method[Any]) -> None:
        method = frame.method
        if isinstance(method, Basic.Nack):
            self._error = f"RabbitMQ refused message {int(method.delivery_tag)}"
        else:
            self._acked_upto = confirmed_upto(self._acked_upto, self._acked_beyond, method)
        self._stop_when_done()

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException | str) -> None:
        self._error = error if isinstance(error, str) else (str(error) or type(error).__name__)
        self._stop()

    def _on_closed(self, connection: pika.SelectConnection, reason: BaseException) -> None:
        if self._error is None:
            self._error = f"connection closed: {reason}"
        self._channel = None
        self._stop()

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if self._error is None:
            self._error = f"channel closed: {reason}"
        self._channel = None
        self._stop()

    def _stop(self) -> None:
        if self._connection is not None:
            self._connection.ioloop.stop()

    def _stop_when_done(self) -> None:
        if self._error is not None or self._done():
            self._stop()


__all__ = ["EventMessage", "EventPublisher"]
