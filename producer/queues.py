"""Queue declarations shared with the workers: dramatiq's layout of work queue, ``.DQ`` delay, ``.XQ`` dead.

Each queue is either a *classic* queue (on one RabbitMQ node) or a *quorum* queue (Raft-replicated
over a majority of a cluster's nodes; docs/high-availability.md). RabbitMQ refuses to declare an
existing queue with other arguments, so every declaration of an installation goes through the
functions here, with the installation's ``queue_type``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import pika
from pika.adapters.blocking_connection import BlockingChannel

from schemas.constants import events_exchange, lane_queues

QueueType = Literal["classic", "quorum"]
QUEUE_TYPES: tuple[QueueType, ...] = ("classic", "quorum")

DEAD_MESSAGE_TTL_MS = 86400000 * 7

DELIVERY_LIMIT = 20
"""Deliveries of one message a quorum work queue allows before it dead-letters the message into
``.XQ`` (reason ``delivery_limit`` in its ``x-death`` header): a message that kills every worker
taking it stops circulating. A delivery counts when its consumer went away without settling it
(a worker process killed, a node lost), so the limit leaves room for many such accidents."""

_QUORUM_DEAD_LETTERING = {
    # A dead-lettered message leaves a quorum queue only once .XQ confirmed it (at-most-once, the
    # default, drops it when .XQ is unavailable at that moment); this needs reject-publish.
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def queue_arguments(queue: str, queue_type: QueueType = "classic") -> dict[str, Any]:
    """The arguments of a lane's work queue ``queue``; every publisher must use the same."""
    arguments: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}
    if queue_type == "quorum":
        arguments.update(
            {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT, **_QUORUM_DEAD_LETTERING}
        )
    return arguments


def delay_queue_arguments(queue: str, queue_type: QueueType = "classic") -> dict[str, Any]:
    """The arguments of ``queue``'s ``.DQ`` delay queue.

    A quorum ``.DQ`` has no delivery limit: its consumer only holds a message until it is due and
    then moves it to the work queue, so its deliveries say nothing about the message, while every
    worker restart returns all it held.
    """
    arguments = queue_arguments(queue, queue_type)
    arguments.pop("x-delivery-limit", None)
    return arguments


def dead_queue_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """The arguments of a ``.XQ`` queue: what lands there expires after seven days (the sweeper
    moves it into the dead-letter store long before)."""
    arguments: dict[str, Any] = {"x-message-ttl": DEAD_MESSAGE_TTL_MS}
    if queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments


def lane_declarations(queue: str, queue_type: QueueType = "classic") -> list[tuple[str, dict[str, Any]]]:
    """``(name, arguments)`` of the work queue ``queue``, its ``.DQ`` and its ``.XQ``."""
    return [
        (queue, queue_arguments(queue, queue_type)),
        (f"{queue}.DQ", delay_queue_arguments(queue, queue_type)),
        (f"{queue}.XQ", dead_queue_arguments(queue_type)),
    ]


def declare_queues(channel: BlockingChannel, queue: str, queue_type: QueueType = "classic") -> None:
    """Declare the work queue with its delay and dead-letter queues exactly as the workers do."""
    for name, arguments in lane_declarations(queue, queue_type):
        channel.queue_declare(queue=name, durable=True, arguments=arguments)


def delete_queues(broker_url: str, queues: Iterable[str]) -> None:
    """Delete each work queue with its delay and dead-letter queues (tests and benchmarks clean up).

    ``broker_url`` may name several nodes separated by ``;``; the first that answers is used.
    """
    connection = pika.BlockingConnection(broker_parameters(broker_url))
    try:
        channel = connection.channel()
        for queue in queues:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
    finally:
        connection.close()


def delete_prefix(broker_url: str, prefix: str) -> None:
    """Delete what ``prefix`` has on the broker: each lane's work, delay and dead-letter queues
    and the events exchange (tests and benchmarks clean up)."""
    delete_queues(broker_url, lane_queues(prefix))
    connection = pika.BlockingConnection(broker_parameters(broker_url))
    try:
        connection.channel().exchange_delete(events_exchange(prefix))
    finally:
        connection.close()


def broker_parameters(broker_url: str) -> list[pika.URLParameters]:
    """The connection parameters of each node in ``broker_url``: AMQP URLs separated by ``;``
    (dramatiq's convention), in the order they are tried."""
    nodes = [pika.URLParameters(url.strip()) for url in broker_url.split(";") if url.strip()]
    if not nodes:
        raise ValueError("the broker URL names no RabbitMQ node")
    return nodes


__all__ = [
    "DEAD_MESSAGE_TTL_MS",
    "DELIVERY_LIMIT",
    "QUEUE_TYPES",
    "QueueType",
    "broker_parameters",
    "dead_queue_arguments",
    "declare_queues",
    "delay_queue_arguments",
    "delete_prefix",
    "delete_queues",
    "lane_declarations",
    "queue_arguments",
]
