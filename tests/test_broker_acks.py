"""The worker's consumer settles exactly the messages its threads finished, acked or rejected."""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
import pika

from producer.publish import publish_messages
from schemas.constants import DOCUMENTS_QUEUE, queue_name
from worker.runtime.broker import make_broker
from worker.settings import Settings


def _publish(settings: Settings, queue: str, count: int) -> None:
    messages = [
        dramatiq.Message(queue_name=queue, actor_name="send_document", args=(n,), kwargs={}, options={})
        for n in range(count)
    ]
    publish_messages([message.asdict() for message in messages], broker_url=settings.broker_url)


def _received(settings: Settings, count: int) -> tuple[Any, Any, str, list[Any]]:
    """``count`` messages published to the documents queue and received by the worker's consumer:
    the broker, the consumer, the queue and the messages."""
    queue = queue_name(settings.queue_prefix, DOCUMENTS_QUEUE)
    broker = make_broker(settings, lambda *_: None)
    consumer = broker.consume(queue, prefetch=count, timeout=50)
    _publish(settings, queue, count)
    messages: list[Any] = []
    deadline = time.monotonic() + 30
    while len(messages) < count and time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            messages.append(message)
    assert len(messages) == count
    return broker, consumer, queue, messages


def _pump(consumer: Any, seconds: float = 0.5) -> None:
    """Let the consumer's connection run the callbacks the threads queued."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert next(consumer) is None


def _waiting(settings: Settings, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def test_acks_and_rejections_from_many_threads_all_reach_the_broker(own_queues: Settings) -> None:
    broker, consumer, queue, messages = _received(own_queues, 300)

    def settle(share: list[Any]) -> None:
        for message in share:
            if message.args[0] % 10 == 0:
                consumer.nack(message)
            else:
                consumer.ack(message)

    threads = [threading.Thread(target=settle, args=(messages[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _pump(consumer)
    consumer.close()
    broker.close()

    assert _waiting(own_queues, queue) == 0
    assert _waiting(own_queues, f"{queue}.XQ") == 30


def test_messages_not_yet_settled_go_back_to_the_queue(own_queues: Settings) -> None:
    broker, consumer, queue, messages = _received(own_queues, 20)
    for message in messages[::2]:
        consumer.ack(message)
    _pump(consumer)
    consumer.close()
    broker.close()

    assert _waiting(own_queues, queue) == 10
    assert _waiting(own_queues, f"{queue}.XQ") == 0
