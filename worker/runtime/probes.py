"""Reachability checks of the broker and the database, for ``/readyz`` and ``postbote check``."""

from __future__ import annotations

import pika
import pika.exceptions

from worker.db import connect
from worker.errors import DatabaseUnavailable


def check_broker(broker_url: str) -> str | None:
    """``None`` when RabbitMQ answers, else what is wrong (without credentials)."""
    params = pika.URLParameters(broker_url)
    params.socket_timeout = 3
    params.blocked_connection_timeout = 3
    params.connection_attempts = 1
    try:
        pika.BlockingConnection(params).close()
    except pika.exceptions.AMQPError as e:
        return f"RabbitMQ at {params.host}:{params.port} unreachable ({type(e).__name__})"
    except OSError as e:
        return f"RabbitMQ at {params.host}:{params.port} unreachable ({e.strerror or e})"
    return None


def check_database(database_url: str) -> str | None:
    """``None`` when PostgreSQL answers a query, else what is wrong."""
    try:
        with connect(database_url) as conn:
            conn.execute("SELECT 1")
    except DatabaseUnavailable as e:
        return str(e)
    return None


__all__ = ["check_broker", "check_database"]
