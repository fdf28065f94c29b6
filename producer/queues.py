"""Queue declarations shared with the workers: dramatiq's layout of work queue, ``.DQ`` delay, ``.XQ`` dead."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

DEAD_MESSAGE_TTL_MS = 86400000 * 7


def queue_arguments(queue: str) -> dict[str, Any]:
    """The arguments dramatiq declares a work (or delay) queue with; every publisher must use the same."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}


def declare_queues(channel: BlockingChannel, queue: str) -> None:
    """Declare the work queue with its delay and dead-letter queues exactly as dramatiq does."""
    channel.queue_declare(queue=queue, durable=True, arguments=queue_arguments(queue))
    channel.queue_declare(queue=f"{queue}.DQ", durable=True, arguments=queue_arguments(queue))
    channel.queue_declare(queue=f"{queue}.XQ", durable=True, arguments={"x-message-ttl": DEAD_MESSAGE_TTL_MS})


def delete_queues(broker_url: str, queues: Iterable[str]) -> None:
    """Delete each work queue with its delay and dead-letter queues (tests and benchmarks clean up)."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        for queue in queues:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
    finally:
        connection.close()


__all__ = ["DEAD_MESSAGE_TTL_MS", "declare_queues", "delete_queues", "queue_arguments"]
