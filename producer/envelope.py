"""The AMQP message that carries a job: dramatiq's message format, JSON-encoded.

A publisher in any language sends to the default exchange with routing key
``<prefix>.documents`` (``<prefix>.receipts`` for receipts), ``delivery_mode=2``,
and this body::

    {"queue_name": "<prefix>.documents", "actor_name": "send_document",
     "args": [<job>], "kwargs": {}, "options": {},
     "message_id": "<job_id>", "message_timestamp": <unix ms>}
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, overload

from pydantic_core import to_json

from schemas.constants import actor_of, lane_of, queue_name
from schemas.job import Job


def envelope(job: Job, prefix: str, *, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dramatiq message for ``job`` on its lane."""
    return _message(job, prefix, job.dump(), options)


def encode_job(job: Job, prefix: str) -> tuple[str, bytes]:
    """``(queue, body)`` of the job's message: the JSON document of ``encode(envelope(job, prefix))``,
    written in one pass by pydantic's encoder (non-ASCII text as UTF-8 rather than escaped)."""
    message = _message(job, prefix, job, None)
    return str(message["queue_name"]), to_json(message, by_alias=True, exclude_none=True)


def encode(message: dict[str, Any]) -> bytes:
    """Encoded as dramatiq's JSON encoder does."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


def _message(job: Job, prefix: str, data: Any, options: dict[str, Any] | None) -> dict[str, Any]:
    lane = lane_of(job.document.type.value)
    return {
        "queue_name": queue_name(prefix, lane),
        "actor_name": actor_of(lane),
        "args": [data],
        "kwargs": {},
        "options": options or {},
        "message_id": str(job.job_id),
        "message_timestamp": int(time.time() * 1000),
    }


class JobMessages(Sequence[tuple[str, bytes]]):
    """``encode_job`` of each job, done when a message is taken: publishing goes through the
    jobs without holding every body in memory at once."""

    def __init__(self, jobs: Sequence[Job], prefix: str) -> None:
        self.jobs = jobs
        self.prefix = prefix

    def queues(self) -> list[str]:
        """The queues the messages go to, each once."""
        lanes = dict.fromkeys(lane_of(job.document.type.value) for job in self.jobs)
        return [queue_name(self.prefix, lane) for lane in lanes]

    def __len__(self) -> int:
        return len(self.jobs)

    @overload
    def __getitem__(self, index: int) -> tuple[str, bytes]: ...

    @overload
    def __getitem__(self, index: slice) -> JobMessages: ...

    def __getitem__(self, index: int | slice) -> tuple[str, bytes] | JobMessages:
        if isinstance(index, slice):
            return JobMessages(self.jobs[index], self.prefix)
        return encode_job(self.jobs[index], self.prefix)


__all__ = ["JobMessages", "encode", "encode_job", "envelope"]
