"""Validate jobs, then publish them persistently with publisher confirms."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pika
import pika.exceptions
from pydantic import ValidationError

from producer.envelope import encode, envelope
from producer.queues import declare_queues
from schemas.constants import DEFAULT_MAX_JOB_BYTES
from schemas.job import Job

_PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")


class PublishError(Exception):
    """The broker did not confirm every job; the message says how many were confirmed."""

    def __init__(self, message: str, confirmed: list[UUID]) -> None:
        super().__init__(message)
        self.confirmed = confirmed


@dataclass(frozen=True)
class InputError:
    """One invalid input line: where, which field, what is wrong."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


def parse_jobs(
    text: str, *, max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
) -> tuple[list[Job], list[InputError]]:
    """Parse one JSON object or JSON lines; every line is validated before anything is published."""
    stripped = text.strip()
    if not stripped:
        return [], [InputError(1, "input", "no job given")]
    if stripped.startswith("{") and "\n" in stripped:
        try:
            return _validate_all([(1, json.loads(stripped))], max_job_bytes)
        except json.JSONDecodeError:
            pass
    items: list[tuple[int, Any]] = []
    errors: list[InputError] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append(InputError(number, "json", f"not valid JSON ({e.msg} at column {e.colno})"))
    jobs, invalid = _validate_all(items, max_job_bytes)
    return jobs, errors + invalid


def _validate_all(items: Iterable[tuple[int, Any]], max_job_bytes: int) -> tuple[list[Job], list[InputError]]:
    jobs: list[Job] = []
    errors: list[InputError] = []
    seen: dict[UUID, int] = {}
    for number, data in items:
        if not isinstance(data, dict):
            errors.append(InputError(number, "job", "must be a JSON object"))
            continue
        try:
            job = Job.model_validate(data, context={"max_job_bytes": max_job_bytes})
        except ValidationError as e:
            for item in e.errors():
                where = ".".join(str(p) for p in item["loc"]) or "job"
                errors.append(InputError(number, where, item["msg"]))
            continue
        if job.job_id in seen:
            errors.append(InputError(number, "job_id", f"same job id as line {seen[job.job_id]}"))
            continue
        seen[job.job_id] = number
        jobs.append(job)
    return jobs, errors


def publish(jobs: Sequence[Job], *, broker_url: str, queue_prefix: str) -> list[UUID]:
    """Publish ``jobs`` as persistent messages; returns their ids once the broker confirmed each.

    Raises:
      PublishError: the broker is unreachable or refused a message; ``confirmed``
        lists the jobs confirmed before that (their ids are safe to report).
    """
    confirmed: list[UUID] = []
    params = pika.URLParameters(broker_url)
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as e:
        raise PublishError(
            f"cannot connect to RabbitMQ at {params.host}:{params.port}: {type(e).__name__}", confirmed
        ) from e
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        declared: set[str] = set()
        for job in jobs:
            message = envelope(job, queue_prefix)
            queue = message["queue_name"]
            if queue not in declared:
                declare_queues(channel, queue)
                declared.add(queue)
            channel.basic_publish("", queue, encode(message), _PERSISTENT, mandatory=True)
            confirmed.append(job.job_id)
    except (pika.exceptions.AMQPError, OSError) as e:
        raise PublishError(
            f"RabbitMQ did not confirm job {len(confirmed) + 1} of {len(jobs)}: {type(e).__name__} {e}",
            confirmed,
        ) from e
    finally:
        if connection.is_open:
            connection.close()
    return confirmed


def publish_messages(messages: Sequence[dict[str, Any]], *, broker_url: str) -> int:
    """Publish ready dramatiq messages (e.g. replays) to their ``queue_name``, persistently and
    confirmed; returns how many were confirmed.

    Raises:
      PublishError: the broker is unreachable or did not confirm a message.
    """
    params = pika.URLParameters(broker_url)
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as e:
        raise PublishError(
            f"cannot connect to RabbitMQ at {params.host}:{params.port}: {type(e).__name__}", []
        ) from e
    confirmed = 0
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for queue in sorted({str(m["queue_name"]) for m in messages}):
            declare_queues(channel, queue)
        for message in messages:
            channel.basic_publish(
                "", str(message["queue_name"]), encode(message), _PERSISTENT, mandatory=True
            )
            confirmed += 1
    except (pika.exceptions.AMQPError, OSError) as e:
        raise PublishError(
            f"RabbitMQ did not confirm message {confirmed + 1}: {type(e).__name__} {e}", []
        ) from e
    finally:
        if connection.is_open:
            connection.close()
    return confirmed


__all__ = ["InputError", "PublishError", "parse_jobs", "publish", "publish_messages"]
