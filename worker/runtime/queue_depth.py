"""How many jobs wait: ready messages per RabbitMQ queue, and the dead-letter store's size and age.

Both reads are passive: a queue is inspected with a passive ``queue_declare``
(which neither creates it nor touches its messages), the dead-letter store with
one aggregate query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pika
import pika.exceptions

from worker.db import Connection, translated_errors
from worker.errors import BrokerUnavailable
from worker.runtime.probes import broker_parameters

_NOT_FOUND = 404


@dataclass(frozen=True)
class DeadLetters:
    count: int
    oldest_age_s: float
    """Seconds since the oldest entry died; 0 when the store is empty."""


def count_ready(broker_url: str, queues: Sequence[str]) -> dict[str, int]:
    """Messages ready for delivery per queue; a queue nobody declared yet has 0.

    Messages a consumer has prefetched but not acknowledged are not counted:
    RabbitMQ reports them as unacknowledged, not ready.

    Raises:
      BrokerUnavailable: RabbitMQ cannot be reached.
    """
    nodes = broker_parameters(broker_url, timeout_s=5)
    counts: dict[str, int] = {}
    try:
        connection = pika.BlockingConnection(nodes)
        try:
            for queue in queues:
                counts[queue] = _ready(connection, queue)
        finally:
            if connection.is_open:
                connection.close()
    except (pika.exceptions.AMQPError, OSError) as e:
        where = ", ".join(f"{p.host}:{p.port}" for p in nodes)
        raise BrokerUnavailable(f"RabbitMQ at {where} unreachable ({type(e).__name__})") from e
    return counts


def _ready(connection: pika.BlockingConnection, queue: str) -> int:
    channel = connection.channel()
    try:
        frame = channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == _NOT_FOUND:
            return 0
        raise
    channel.close()
    return int(frame.method.message_count)


def read_dead_letters(conn: Connection) -> DeadLetters:
    """Entries in the dead-letter store and the age of the oldest, by the database's clock.

    Raises:
      DatabaseUnavailable: PostgreSQL cannot be reached.
    """
    with translated_errors():
        row = conn.execute(
            "SELECT count(*) AS count,"
            " coalesce(extract(epoch FROM now() - min(dead_at)), 0)::float8 AS age FROM dead_letters"
        ).fetchone()
    assert row is not None
    return DeadLetters(count=int(row["count"]), oldest_age_s=max(0.0, float(row["age"])))


__all__ = ["DeadLetters", "count_ready", "read_dead_letters"]
