"""Publish many messages with publisher confirms without waiting for each one (pika's async connection).

The blocking channel in confirm mode waits for the broker's ack after every
message; here up to ``window`` messages are in flight and the broker's
(multiple) acks are collected as they come. The call returns once every
message is confirmed, or raises with the count of those confirmed in order.

Queues that exist are only checked (a passive declaration), whatever their type, so a producer
never fails on a queue the workers declared as quorum while it was told ``classic``, nor during
``postbote queues migrate``; a missing lane is declared with ``queue_type``. Given several nodes
(a cluster), a run that fails on one goes on from its first unconfirmed message on the next: a
message published twice is still sent once (the workers' ledger is keyed by the job id).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic

from producer.queues import QueueType, lane_declarations

_ROUNDS = 2
_ROUND_PAUSE_S = 1.0


class _QuietMissingQueue(logging.Filter):
    """pika logs every channel the broker closes as a warning; a passive check of a lane that
    does not exist yet closes one on purpose (404), and the lane is then declared."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Received remote Channel.Close") and args[:1] == (404,))


logging.getLogger("pika.channel").addFilter(_QuietMissingQueue())


def _properties(parameters: pika.connection.Parameters) -> pika.BasicProperties:
    """Persistent JSON, naming the publishing RabbitMQ user (``user_id``, which RabbitMQ checks
    against the connection's user), so a tenant can limit who publishes for it."""
    credentials = parameters.credentials
    user = credentials.username if isinstance(credentials, pika.PlainCredentials) else None
    return pika.BasicProperties(delivery_mode=2, content_type="application/json", user_id=user)


class ConfirmError(Exception):
    """Not every message was confirmed; ``confirmed`` counts the leading ones that were."""

    def __init__(self, message: str, confirmed: int) -> None:
        super().__init__(message)
        self.confirmed = confirmed


def publish_confirmed(
    parameters: pika.connection.Parameters | Sequence[pika.connection.Parameters],
    messages: Sequence[tuple[str, bytes]],
    *,
    window: int = 2000,
    queue_type: QueueType = "classic",
    queues: Sequence[str] | None = None,
) -> None:
    """Publish ``(queue, body)`` pairs persistently; return when the broker confirmed all of them.

    ``parameters`` may list several nodes of a cluster: each is tried in turn (twice round, a
    second apart), each going on from the first message not confirmed yet. ``queues`` names the
    queues the messages go to, where the caller knows them without reading every message.

    Raises:
      ConfirmError: no node confirmed every message; ``confirmed`` counts the leading ones that were.
    """
    nodes = [parameters] if isinstance(parameters, pika.connection.Parameters) else list(parameters)
    if queues is None:
        queues = list(dict.fromkeys(queue for queue, _ in messages))
    done = 0
    errors: list[str] = []
    for round_no in range(_ROUNDS):
        if round_no:
            time.sleep(_ROUND_PAUSE_S)
        for node in nodes:
            run = _Run(node, messages[done:], queues, window, queue_type)
            try:
                run.connection.ioloop.start()
            finally:
                run.connection.ioloop.close()
            if run.error is None:
                return
            done += run.confirmed_prefix()
            errors.append(f"{run.error} ({node.host}:{node.port})")
    raise ConfirmError("; ".join(errors[-len(nodes) :]), done)


class _Run:
    def __init__(
        self,
        parameters: pika.connection.Parameters,
        messages: Sequence[tuple[str, bytes]],
        queues: Sequence[str],
        window: int,
        queue_type: QueueType,
    ) -> None:
        self.messages = messages
        self.window = window
        self.queue_type = queue_type
        self.unchecked = list(queues)
        self.declaring: Channel | None = None
        self.properties = _properties(parameters)
        self.sent = 0
        self.acked_upto = 0
        self.acked_beyond: set[int] = set()
        self.frozen: int | None = None
        self.error: str | None = None
        self.channel: Channel | None = None
        self.connection = pika.SelectConnection(
            parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )

    def confirmed_prefix(self) -> int:
        """How many leading messages the broker confirmed (frozen at the first failure)."""
        return self.acked_upto if self.frozen is None else self.frozen

    def _fail(self, error: str, confirmed: int) -> None:
        if self.error is None:
            self.error = error
            self.frozen = min(confirmed, self.acked_upto)
        if self.connection.is_open:
            self.connection.close()

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_declaring_channel)

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException | str) -> None:
        self.error = (
            f"cannot connect to RabbitMQ: {type(error).__name__ if not isinstance(error, str) else error}"
        )
        connection.ioloop.stop()

    def _on_closed(self, connection: pika.SelectConnection, reason: BaseException) -> None:
        if self.error is None and self.acked_upto < len(self.messages):
            if isinstance(reason, pika.exceptions.ConnectionBlockedTimeout):
                self.error = (
                    "RabbitMQ blocked publishing and did not resume in time (a memory or disk alarm?)"
                )
            else:
                self.error = f"connection to RabbitMQ closed: {reason}"
            self.frozen = self.acked_upto
        connection.ioloop.stop()

    def _on_declaring_channel(self, channel: Channel) -> None:
        self.declaring = channel
        channel.add_on_close_callback(self._on_declaring_closed)
        self._check_next()

    def _check_next(self) -> None:
        """Check the next queue passively; a 404 closes the channel (``_on_declaring_closed``)."""
        assert self.declaring is not None
        if not self.unchecked:
            channel, self.declaring = self.declaring, None
            channel.close()
            self.connection.channel(on_open_callback=self._on_channel)
            return
        self.declaring.queue_declare(self.unchecked[0], passive=True, callback=lambda _: self._checked())

    def _checked(self) -> None:
        self.unchecked.pop(0)
        self._check_next()

    def _on_declaring_closed(self, channel: Channel, reason: BaseException) -> None:
        if self.declaring is not channel:
            return  # closed by _check_next
        self.declaring = None
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == 404:
            queue = self.unchecked[0]
            self.connection.channel(on_open_callback=lambda fresh: self._create_lane(fresh, queue))
        else:
            self._fail(f"RabbitMQ refused to declare {self.unchecked[0]}: {reason}", 0)

    def _create_lane(self, channel: Channel, queue: str) -> None:
        self.declaring = channel
        channel.add_on_close_callback(self._on_declaring_closed)
        steps = [
            _declare(channel, name, arguments)
            for name, arguments in lane_declarations(queue, self.queue_type)
        ]
        _chain(steps, self._checked)

    def _on_channel(self, channel: Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _: self._publish_more())

    def _publish_more(self) -> None:
        assert self.channel is not None
        while self.sent < len(self.messages) and self.sent - self.acked_upto < self.window:
            queue, body = self.messages[self.sent]
            self.channel.basic_publish("", queue, body, self.properties, mandatory=True)
            self.sent += 1
        if not self.messages:
            self.connection.close()

    def _on_confirm(self, frame: Method[Any]) -> None:
        method = frame.method
        if isinstance(method, Basic.Nack):
            tag = int(method.delivery_tag)
            self._fail(f"RabbitMQ refused message {tag}", tag - 1)
            return
        self.acked_upto = confirmed_upto(self.acked_upto, self.acked_beyond, method)
        if self.error is not None:
            return
        if self.acked_upto >= len(self.messages):
            self.connection.close()
        else:
            self._publish_more()

    def _on_return(self, channel: Channel, method: Basic.Return, properties: Any, body: bytes) -> None:
        self._fail(
            f"RabbitMQ could not route a message to {method.routing_key}: {method.reply_text}",
            self.acked_upto,
        )

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if self.confirmed_prefix() < len(self.messages):
            self._fail(f"RabbitMQ closed the channel: {reason}", self.acked_upto)


def confirmed_upto(acked_upto: int, acked_beyond: set[int], ack: Basic.Ack) -> int:
    """How many leading delivery tags are confirmed after ``ack``, given ``acked_upto`` before it
    and the tags confirmed beyond those (``acked_beyond``, updated in place)."""
    tag = int(ack.delivery_tag)
    if ack.multiple:
        acked_upto = max(acked_upto, tag)
    else:
        acked_beyond.add(tag)
    while acked_upto + 1 in acked_beyond:
        acked_upto += 1
        acked_beyond.discard(acked_upto)
    return acked_upto


_Step = Callable[[Callable[[], None]], None]


def _declare(channel: Channel, queue: str, arguments: dict[str, Any]) -> _Step:
    def step(then: Callable[[], None]) -> None:
        channel.queue_declare(queue, durable=True, arguments=arguments, callback=lambda _: then())

    return step


def _chain(steps: list[_Step], done: Callable[[], None]) -> None:
    if not steps:
        done()
        return
    steps[0](lambda: _chain(steps[1:], done))


__all__ = ["ConfirmError", "confirmed_upto", "publish_confirmed"]
