"""The RabbitMQ broker as dramatiq sees it, and the consumer that takes untrusted messages off it.

Anything with publish rights on the vhost writes to postbote's queues, so the consumer
treats every body as untrusted input before dramatiq sees it (see ``docs/untrusted-input.md``):

- a body larger than ``Settings.max_message_bytes`` is rejected unread, and a body that is
  no dramatiq message (not JSON, a field missing or of the wrong type) is rejected, both
  into the lane's ``.XQ`` queue, where the sweeper stores them with a reason; neither
  body is ever logged;
- the message's queue and actor are those of the queue it was consumed from, whatever
  the body names;
- options (attempt counts, ``eta``, an outcome waiting to be recorded, the publisher) are
  kept only with a seal a worker made (``worker.runtime.seal``); without one the message
  is processed with none but ``publisher``, the ``user_id`` property RabbitMQ checked,
  and a ``message_timestamp`` that is not a number or lies in the future counts as now.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pika.exceptions
from dramatiq import Message, get_encoder
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import Middleware, ShutdownNotifications, TimeLimit

from producer.queues import QueueType, dead_queue_arguments, delay_queue_arguments, queue_arguments
from schemas.constants import LANES, actor_of
from worker.library_internals import (
    RabbitmqBrokerBase,
    RabbitmqConsumerBase,
    delivery_tag,
    rabbitmq_message,
    set_pika_read_size,
    underlying_channel,
)
from worker.runtime import metrics
from worker.runtime.middleware import GiveUp, RetryPolicy
from worker.runtime.middleware.retries import PUBLISHER
from worker.runtime.seal import SEAL, Sealer, SealOptions, load_seal_key
from worker.settings import Settings

logger = logging.getLogger(__name__)

# pika reads 4 KB per recv(): a job with its PDF (~40 KB) takes ten reads, each followed by a
# copy of the growing frame buffer. 64 KB reads cost a consumer ~95 µs per such message
# instead of ~125 µs; larger reads lose again to pika re-copying the rest of its buffer
# after every frame.
set_pika_read_size(64 * 1024)

_FIELD_TYPES: dict[str, type] = {
    "queue_name": str,
    "actor_name": str,
    "args": list,
    "kwargs": dict,
    "options": dict,
    "message_id": str,
}
"""The fields of a dramatiq message and their JSON types; ``message_timestamp`` may be missing."""

MAX_MESSAGE_ID_CHARS = 255

_LANE_OF_ACTOR = {actor_of(lane): lane for lane in LANES}


def envelope_problem(fields: Any) -> str | None:
    """Why decoded JSON is no dramatiq message a worker takes, or ``None`` when it is one.

    The answer never quotes the body: field names and types only.
    """
    if not isinstance(fields, dict):
        return f"the body is a JSON {type(fields).__name__}, not an object"
    missing = [name for name in _FIELD_TYPES if name not in fields]
    if missing:
        return f"missing {', '.join(missing)}"
    unknown = len(fields) - len(_FIELD_TYPES) - ("message_timestamp" in fields)
    if unknown:
        return f"{unknown} fields dramatiq does not have"
    wrong = [name for name, kind in _FIELD_TYPES.items() if not isinstance(fields[name], kind)]
    if wrong:
        return f"wrong type of {', '.join(wrong)}"
    if not 0 < len(fields["message_id"]) <= MAX_MESSAGE_ID_CHARS:
        return f"message_id empty or longer than {MAX_MESSAGE_ID_CHARS} characters"
    return None


class _Unreadable(Exception):
    """A body the consumer rejects without handing it to dramatiq; the text says why, without the body."""


class _GuardedConsumer(RabbitmqConsumerBase):
    """dramatiq's RabbitMQ consumer, reading each body as untrusted input (see the module docstring)."""

    broker: _Broker

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._canonical = q_name(self.queue_name)
        self._delayed = self.queue_name != self._canonical
        self._actor = self._lane_actor()
        self._lane = _LANE_OF_ACTOR.get(self._actor or "", self._canonical)
        self._sealer = self.broker.sealer
        self._max_bytes = self.broker.max_message_bytes
        self._decode = get_encoder().decode

    def _lane_actor(self) -> str | None:
        """The one actor declared on this consumer's queue (``None``: none or several)."""
        broker = self.broker
        names = [n for n in broker.get_declared_actors() if broker.get_actor(n).queue_name == self._canonical]
        return names[0] if len(names) == 1 else None

    def __next__(self) -> MessageProxy | None:
        try:
            method, properties, body = next(self.iterator)
            if method is None:
                return None
        except (
            AssertionError,
            pika.exceptions.AMQPConnectionError,
            pika.exceptions.AMQPChannelError,
        ) as e:
            # As dramatiq's own consumer: a queue that disappeared is declared again on restart.
            if getattr(e, "reply_code", None) == 404:
                self.broker.queues_pending.add(self._canonical)
            raise ConnectionClosed(e) from None  # type: ignore[no-untyped-call]
        tag: int = method.delivery_tag
        try:
            message = self._admit(body, properties.user_id)
        except _Unreadable as e:
            logger.warning(
                "rejected message %d on %s (%d bytes) into its .XQ queue: %s",
                tag,
                self.queue_name,
                len(body),
                e,
            )
            try:
                self.channel.basic_nack(tag, requeue=False)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as error:
                raise ConnectionClosed(error) from None  # type: ignore[no-untyped-call]
            return None
        self.known_tags.add(tag)
        return rabbitmq_message(method.redelivered, tag, message)

    def _admit(self, body: bytes, user_id: str | None) -> Message[Any]:
        """The message ``body`` carries, as the worker takes it.

        Raises:
          _Unreadable: the body is too large, or no dramatiq message.
        """
        if len(body) > self._max_bytes:
            raise _Unreadable(f"larger than the {self._max_bytes} bytes a worker reads (max_message_bytes)")
        try:
            fields = self._decode(body)
        except Exception as e:  # the encoder's error may quote the body: only its class is logged
            cause = e.__cause__ or getattr(e, "error", None) or e
            raise _Unreadable(f"not JSON ({type(cause).__name__})") from None
        problem = envelope_problem(fields)
        if problem is not None:
            raise _Unreadable(f"not a dramatiq message: {problem}")
        message_id: str = fields["message_id"]
        timestamp = fields.get("message_timestamp")
        options: dict[str, Any] = fields["options"]
        if options and self._sealer.verify(message_id, timestamp, options, fields["args"], fields["kwargs"]):
            del options[SEAL]
        else:
            if options:
                metrics.UNSEALED_OPTIONS.labels(self._lane).inc()
                logger.warning(
                    "message %r on %s carried %d options without a valid seal; processing it without them",
                    message_id,
                    self.queue_name,
                    len(options),
                )
            options = {PUBLISHER: user_id}
        now = int(time.time() * 1000)
        if type(timestamp) is not int or timestamp > now:
            timestamp = now
        if self._delayed and "eta" not in options:
            # Due now: dramatiq moves it to the lane's queue, where it is processed as any other.
            options["eta"] = now
        return Message(
            queue_name=self.queue_name,
            actor_name=self._actor or fields["actor_name"],
            args=tuple(fields["args"]),
            kwargs=fields["kwargs"],
            options=options,
            message_id=message_id,
            message_timestamp=timestamp,
        )


class _BatchedAcks(_GuardedConsumer):
    """The worker's consumer, with cheaper acknowledgements.

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
        super().__init__(*args, **kwargs)

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


class _Broker(RabbitmqBrokerBase):
    """dramatiq's RabbitMQ broker with postbote's consumer, declaring every queue of a lane
    as ``producer.queues`` does, with the installation's queue type (dramatiq itself declares
    only classic queues)."""

    def __init__(
        self, *, sealer: Sealer, max_message_bytes: int, queue_type: QueueType = "classic", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.sealer = sealer
        self.max_message_bytes = max_message_bytes
        self.queue_type: QueueType = queue_type

    @property
    def consumer_class(self) -> type[RabbitmqConsumerBase]:
        return _BatchedAcks

    def _declare_queue(self, queue_name: str) -> Any:
        return self._declare(queue_name, queue_arguments(queue_name, self.queue_type))

    def _declare_dq_queue(self, queue_name: str) -> Any:
        return self._declare(dq_name(queue_name), delay_queue_arguments(queue_name, self.queue_type))

    def _declare_xq_queue(self, queue_name: str) -> Any:
        return self._declare(xq_name(queue_name), dead_queue_arguments(self.queue_type))

    def _declare(self, name: str, arguments: dict[str, Any]) -> Any:
        try:
            return self.channel.queue_declare(queue=name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 406:
                logger.error(
                    "RabbitMQ refused to declare %s as a %s queue (%s): every worker must name the "
                    "installation's POSTBOTE_QUEUE_TYPE; `postbote queues migrate --to %s` changes the queues",
                    name,
                    self.queue_type,
                    e.reply_text,
                    self.queue_type,
                )
            raise


_BLOCKED_TIMEOUT_S = 30.0


def make_broker(
    settings: Settings,
    give_up: GiveUp,
    extra: list[Middleware] | None = None,
    *,
    sealer: Sealer | None = None,
) -> RabbitmqBroker:
    """A confirm-delivery RabbitMQ broker whose retry policy dead-letters through ``give_up``.

    Permanent errors never reach the retry policy: the actor records and
    dead-letters them itself. Transient ones are retried with exponential
    backoff and jitter, capped at ``max_backoff_ms`` so a delayed retry is never
    held unacknowledged anywhere near RabbitMQ's 30-minute consumer timeout.
    dramatiq's own ``Retries`` is deliberately absent (see ``RetryPolicy``).

    Its queues are declared with ``settings.queue_type`` (``producer.queues``); ``broker_url``
    may name several nodes separated by ``;``, tried in order whenever a connection is (re)made.

    Every message the broker enqueues is sealed with ``sealer`` (by default one with the
    installation's key, read from the database), and its consumers verify the seals.
    """
    middleware: list[Middleware] = [
        TimeLimit(time_limit=max(10 * settings.smtp_timeout_ms, 600_000)),
        ShutdownNotifications(),
        RetryPolicy(settings, give_up),
        *(extra or []),
    ]
    sealer = sealer or Sealer(load_seal_key(settings.database_url))
    # Last, so it seals the options as the middleware before it left them.
    middleware.append(SealOptions(sealer))
    broker = _Broker(
        sealer=sealer,
        max_message_bytes=settings.max_message_bytes,
        queue_type=settings.queue_type,
        url=settings.broker_url,
        confirm_delivery=True,
        middleware=middleware,
    )
    parameters = broker.parameters if isinstance(broker.parameters, list) else [broker.parameters]
    for each in parameters:
        # A broker under a memory or disk alarm blocks publishers: a requeue fails after this
        # long (the message is then rejected to .XQ, where the sweeper keeps it) instead of
        # holding a worker thread forever.
        each.blocked_connection_timeout = _BLOCKED_TIMEOUT_S
    return broker


__all__ = ["MAX_MESSAGE_ID_CHARS", "envelope_problem", "make_broker"]
