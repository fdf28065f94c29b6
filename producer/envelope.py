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
from typing import Any

from schemas.constants import actor_of, lane_of, queue_name
from schemas.job import Job


def envelope(job: Job, prefix: str, *, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dramatiq message for ``job`` on its lane."""
    lane = lane_of(job.document.type.value)
    return {
        "queue_name": queue_name(prefix, lane),
        "actor_name": actor_of(lane),
        "args": [job.dump()],
        "kwargs": {},
        "options": options or {},
        "message_id": str(job.job_id),
        "message_timestamp": int(time.time() * 1000),
    }


def encode_job(job: Job, prefix: str) -> tuple[str, bytes]:
    """``(queue, body)`` of the job's message: the same bytes as ``encode(envelope(job, prefix))``
    up to key order, with the job serialized by pydantic's own encoder (the bulk of the work)."""
    shell = envelope(job.model_copy(update={"attachments": []}), prefix)
    shell["args"] = ["\0job\0"]
    head, _, tail = encode(shell).partition(b'"\\u0000job\\u0000"')
    return str(shell["queue_name"]), b"".join((head, job.dump_json(), tail))


def encode(message: dict[str, Any]) -> bytes:
    """Encoded as dramatiq's JSON encoder does."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


__all__ = ["encode", "encode_job", "envelope"]
