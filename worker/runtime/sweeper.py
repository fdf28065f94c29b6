"""Moves what RabbitMQ dead-lettered into a ``.XQ`` queue into the dead-letter store, with a reason.

dramatiq rejects a message whose body it cannot decode (not JSON, not a dramatiq
message) or whose actor it does not know straight into the lane's ``.XQ`` queue, which keeps no reason and
expires after seven days; a message the retry policy could not requeue ends
there too. The supervisor runs ``sweep_forever`` so such messages become
ordinary dead jobs that ``postbote dlq`` lists and nobody has to watch ``.XQ``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any
from uuid import UUID

import pika
import pika.exceptions
from dramatiq.common import q_name
from pydantic import ValidationError

from producer.queues import declare_queues
from schemas.constants import (
    SEND_DOCUMENT_ACTOR,
    SEND_RECEIPT_ACTOR,
    lane_queues,
)
from schemas.job import Job
from worker.db import connect
from worker.errors import DatabaseUnavailable
from worker.job.deadletter import DeadJob, store_dead_job
from worker.settings import Settings
from worker.vocabulary import Reason

logger = logging.getLogger(__name__)

_MESSAGE_FIELDS = ("queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp")


def dead_job_of(body: bytes, queue: str) -> DeadJob:
    """What a body found in ``queue``'s ``.XQ`` is, as a dead job with a reason."""
    raw_id = "raw-" + hashlib.sha256(body).hexdigest()[:32]
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return DeadJob(
            raw_id, queue, Reason.MALFORMED_JSON, f"the message body is not JSON: {e}", 1, raw_body=body
        )
    missing = [f for f in _MESSAGE_FIELDS if not isinstance(fields, dict) or f not in fields]
    if missing:
        return DeadJob(
            raw_id,
            queue,
            Reason.NOT_A_DRAMATIQ_MESSAGE,
            f"the message body is JSON but not a dramatiq message (missing {', '.join(missing)})",
            1,
            raw_body=body,
        )
    options = fields.get("options") or {}
    args = fields.get("args") or []
    try:
        job: Job | None = Job.model_validate(args[0]) if len(args) == 1 else None
    except ValidationError:
        job = None
    actor = fields.get("actor_name")
    if actor not in (SEND_DOCUMENT_ACTOR, SEND_RECEIPT_ACTOR):
        reason, detail = Reason.UNKNOWN_ACTOR, f"no postbote actor is called {actor!r}"
    else:
        reason, detail = (
            Reason.REJECTED_BY_WORKER,
            "a worker rejected the message without saying why (see its log)",
        )
    return DeadJob(
        id=str(job.job_id) if job else str(fields["message_id"]),
        queue_name=q_name(str(fields["queue_name"])),
        reason=reason,
        detail=detail,
        attempts=int(options.get("retries", 0)) if isinstance(options, dict) else 0,
        job_id=job.job_id if job else _uuid(fields.get("message_id")),
        tenant=job.tenant if job else None,
        doc_type=job.document.type.value if job else None,
        doc_number=job.document.number if job else None,
        message=fields,
    )


def sweep_once(settings: Settings) -> int:
    """Move every message now in the lanes' ``.XQ`` queues into the store; returns how many."""
    moved = 0
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        with connect(settings.database_url) as conn:
            for queue in lane_queues(settings.queue_prefix):
                declare_queues(channel, queue)
                while True:
                    method, _, body = channel.basic_get(f"{queue}.XQ", auto_ack=False)
                    if method is None:
                        break
                    try:
                        dead = dead_job_of(body, queue)
                        store_dead_job(conn, dead)
                    except DatabaseUnavailable:
                        channel.basic_nack(method.delivery_tag, requeue=True)
                        raise
                    channel.basic_ack(method.delivery_tag)
                    logger.warning("dead-lettered %s from %s.XQ: %s", dead.id, queue, dead.reason)
                    moved += 1
    finally:
        if connection.is_open:
            connection.close()
    return moved


def sweep_forever(settings: Settings, stop: threading.Event, *, interval_s: float = 2.0) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; outages are logged and outlasted."""
    while not stop.wait(interval_s):
        try:
            sweep_once(settings)
        except (pika.exceptions.AMQPError, OSError, DatabaseUnavailable) as e:
            logger.info("dead-queue sweep skipped: %s", e or type(e).__name__)


def _uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value))
    except ValueError:
        return None


__all__ = ["dead_job_of", "sweep_forever", "sweep_once"]
