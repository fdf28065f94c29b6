"""Validate jobs, then publish them persistently with publisher confirms."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from producer.confirms import ConfirmError, publish_confirmed
from producer.envelope import encode, encode_job
from producer.queues import QueueType, broker_parameters
from schemas.constants import DEFAULT_MAX_JOB_BYTES
from schemas.job import Job


class PublishError(Exception):
    """The broker did not confirm every message: ``confirmed_count`` leading ones it did, and
    ``confirmed`` lists their job ids where the caller published jobs."""

    def __init__(self, message: str, *, confirmed_count: int, confirmed: Sequence[UUID] = ()) -> None:
        super().__init__(message)
        self.confirmed_count = confirmed_count
        self.confirmed = list(confirmed)


@dataclass(frozen=True)
class InvalidLine:
    """One invalid input line: where, which field, what is wrong."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


def parse_jobs(
    text: str, *, max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
) -> tuple[list[Job], list[InvalidLine]]:
    """Parse one JSON object or JSON lines; every line is validated before anything is published."""
    stripped = text.strip()
    if not stripped:
        return [], [InvalidLine(1, "input", "no job given")]
    if stripped.startswith("{") and "\n" in stripped:
        try:
            return _validate_all([(1, json.loads(stripped))], max_job_bytes)
        except json.JSONDecodeError:
            pass
    items: list[tuple[int, Any]] = []
    errors: list[InvalidLine] = []
    # JSON lines end in LF (CRLF tolerated); str.splitlines() would also split inside a JSON
    # string at U+2028, U+0085 and other line breaks JSON allows unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append(InvalidLine(number, "json", f"not valid JSON ({e.msg} at column {e.colno})"))
    jobs, invalid = _validate_all(items, max_job_bytes)
    return jobs, errors + invalid


def _validate_all(
    items: Iterable[tuple[int, Any]], max_job_bytes: int
) -> tuple[list[Job], list[InvalidLine]]:
    jobs: list[Job] = []
    errors: list[InvalidLine] = []
    seen: dict[UUID, int] = {}
    for number, data in items:
        if not isinstance(data, dict):
            errors.append(InvalidLine(number, "job", "must be a JSON object"))
            continue
        try:
            job = Job.model_validate(data, context={"max_job_bytes": max_job_bytes})
        except ValidationError as e:
            for item in e.errors():
                where = ".".join(str(p) for p in item["loc"]) or "job"
                errors.append(InvalidLine(number, where, item["msg"]))
            continue
        if job.job_id in seen:
            errors.append(InvalidLine(number, "job_id", f"same job id as line {seen[job.job_id]}"))
            continue
        seen[job.job_id] = number
        jobs.append(job)
    return jobs, errors


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
        _publish_encoded([encode_job(job, queue_prefix) for job in jobs], broker_url, queue_type)
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


def _publish_encoded(messages: list[tuple[str, bytes]], broker_url: str, queue_type: QueueType) -> None:
    nodes = broker_parameters(broker_url)
    for params in nodes:
        params.connection_attempts = 1
        params.socket_timeout = 10
        # A broker under a memory or disk alarm blocks publishers; fail instead of waiting forever.
        params.blocked_connection_timeout = 30
    try:
        publish_confirmed(nodes, messages, queue_type=queue_type)
    except ConfirmError as e:
        raise PublishError(str(e), confirmed_count=e.confirmed) from e


__all__ = ["InvalidLine", "PublishError", "parse_jobs", "publish", "publish_messages"]
