"""Publish validated jobs persistently with publisher confirms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from producer.confirms import ConfirmError, publish_confirmed
from producer.envelope import JobMessages, encode
from producer.queues import QueueType, broker_parameters
from schemas.job import Job


class PublishError(Exception):
    """The broker did not confirm every message: ``confirmed_count`` leading ones it did, and
    ``confirmed`` lists their job ids where the caller published jobs."""

    def __init__(self, message: str, *, confirmed_count: int, confirmed: Sequence[UUID] = ()) -> None:
        super().__init__(message)
        self.confirmed_count = confirmed_count
        self.confirmed = list(confirmed)


def publish(
    jobs: Sequence[Job], *, broker_url: str, queue_prefix: str, queue_type: QueueType = "classic"
) -> list[UUID]:
    """Publish ``jobs`` as persistent messages; returns their ids once the broker confirmed each.

    Confirms are collected in batches (many messages in flight), but nothing is
    reported before the broker confirmed it. ``broker_url`` may name several nodes of a
    cluster, separated by ``;``: when one fails, the rest go to the next. ``queue_type`` is
    the type a lane is declared with when it does not exist yet.

    Raises:
      PublishError: the broker is unreachable or refused a message; ``confirmed``
        lists the jobs confirmed before that (their ids are safe to report).
    """
    try:
        messages = JobMessages(jobs, queue_prefix)
        _publish_encoded(messages, broker_url, queue_type, messages.queues())
    except PublishError as e:
        confirmed = [job.job_id for job in jobs[: e.confirmed_count]]
        raise PublishError(str(e), confirmed_count=e.confirmed_count, confirmed=confirmed) from e
    return [job.job_id for job in jobs]


def publish_messages(
    messages: Sequence[dict[str, Any]], *, broker_url: str, queue_type: QueueType = "classic"
) -> int:
    """Publish ready dramatiq messages (jobs, replays) to their ``queue_name``, persistently,
    returning once the broker confirmed all of them; returns how many.

    Raises:
      PublishError: the broker is unreachable or did not confirm a message;
        ``confirmed_count`` says how many leading messages it did confirm.
    """
    _publish_encoded([(str(m["queue_name"]), encode(m)) for m in messages], broker_url, queue_type)
    return len(messages)


def _publish_encoded(
    messages: Sequence[tuple[str, bytes]],
    broker_url: str,
    queue_type: QueueType,
    queues: Sequence[str] | None = None,
) -> None:
    nodes = broker_parameters(broker_url)
    for params in nodes:
        params.connection_attempts = 1
        params.socket_timeout = 10
        # A broker under a memory or disk alarm blocks publishers; fail instead of waiting forever.
        params.blocked_connection_timeout = 30
    try:
        publish_confirmed(nodes, messages, queue_type=queue_type, queues=queues)
    except ConfirmError as e:
        raise PublishError(str(e), confirmed_count=e.confirmed) from e


__all__ = ["PublishError", "publish", "publish_messages"]
