"""Moves what RabbitMQ dead-lettered into a ``.XQ`` queue into the dead-letter store, with a reason.

The consumer rejects a body larger than ``max_message_bytes`` unread, and one that is no dramatiq
message (not JSON, a field missing or of the wrong type), straight into the lane's ``.XQ``
queue, which keeps no reason and expires after seven days; a message the retry policy could
not requeue ends there too. The supervisor runs ``sweep_forever`` so such messages become
ordinary dead jobs that ``postbote dlq`` lists and nobody has to watch ``.XQ``.

Anyone allowed to publish can put anything there, so reading a body never raises: whatever it is,
it is stored with a reason (and its raw bytes when it is no dramatiq message), then acknowledged.
A message is acknowledged only once it is stored; one that cannot be stored goes back to ``.XQ``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from dataclasses import replace
from typing import Any
from uuid import UUID

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import ValidationError

from producer.queues import DELIVERY_LIMIT, declare_queues
from schemas.constants import (
    SEND_DOCUMENT_ACTOR,
    SEND_RECEIPT_ACTOR,
    lane_queues,
)
from schemas.job import Job
from worker.db import Connection, connect
from worker.errors import DatabaseUnavailable
from worker.job.deadletter import DeadJob, store_dead_job
from worker.runtime.broker import envelope_problem
from worker.runtime.probes import broker_parameters
from worker.settings import Settings
from worker.vocabulary import Reason

logger = logging.getLogger(__name__)

KEPT_PREFIX_BYTES = 64 * 1024
"""How much of a ``too_large`` body is kept."""

_MAX_ATTEMPTS = 2**31 - 1


def dead_job_of(body: bytes, queue: str, *, max_body_bytes: int | None = None) -> DeadJob:
    """What a body found in ``queue``'s ``.XQ`` is, as a dead job with a reason.

    A body longer than ``max_body_bytes`` is not decoded: it is ``too_large``, stored with its
    size, its sha256 and its first 64 KiB. The dead job is keyed by the job id, else by a valid
    dramatiq message id, else by ``raw-`` and the body's sha256. Never raises for any body.
    """
    if max_body_bytes is not None and len(body) > max_body_bytes:
        return DeadJob(
            raw_id(body),
            queue,
            Reason.TOO_LARGE,
            f"the message body has {len(body)} bytes, more than the {max_body_bytes} a worker reads"
            f" (sha256 {hashlib.sha256(body).hexdigest()}); its first {KEPT_PREFIX_BYTES} bytes are kept",
            1,
            raw_body=body[:KEPT_PREFIX_BYTES],
        )
    try:
        fields = json.loads(body)
    except RecursionError:
        return _raw(body, queue, Reason.MALFORMED_JSON, "the message body is JSON nested too deeply to read")
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and int digits over the limit
        return _raw(body, queue, Reason.MALFORMED_JSON, f"the message body is not JSON: {_short(e)}")
    problem = envelope_problem(fields)
    if problem:
        return _raw(
            body,
            queue,
            Reason.NOT_A_DRAMATIQ_MESSAGE,
            f"the message body is JSON but not a dramatiq message ({problem})",
        )
    return _message_dead_job(fields, queue)


def raw_id(body: bytes) -> str:
    """The dead-letter id of a body that carries no usable id: ``raw-`` and a sha256 prefix."""
    return "raw-" + hashlib.sha256(body).hexdigest()[:32]


class UnstoredMessages(Exception):
    """Messages in ``.XQ`` that could not be stored even raw: they wait at the end of ``.XQ``."""


def sweep_once(settings: Settings) -> int:
    """Move every message now in the lanes' ``.XQ`` queues into the store; returns how many.

    A message that cannot be stored even raw (for a reason other than an outage) is put back at
    the end of its ``.XQ`` queue, so the messages behind it are still stored, and the sweep ends
    with ``UnstoredMessages``.

    Raises:
      DatabaseUnavailable, pika.exceptions.AMQPError, OSError: an outage; the message being
        handled stays in ``.XQ``.
      UnstoredMessages: some messages could not be stored; they stay in ``.XQ``.
    """
    moved = kept = 0
    limit = settings.max_message_bytes
    connection = pika.BlockingConnection(broker_parameters(settings.broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        with connect(settings.database_url) as conn:
            for queue in lane_queues(settings.queue_prefix):
                declare_queues(channel, queue, settings.queue_type)
                lane_moved, lane_kept = _sweep_lane(channel, conn, queue, limit)
                moved, kept = moved + lane_moved, kept + lane_kept
    finally:
        if connection.is_open:
            connection.close()
    if kept:
        raise UnstoredMessages(f"{kept} message(s) could not be stored; they wait in .XQ")
    return moved


def _sweep_lane(channel: BlockingChannel, conn: Connection, queue: str, limit: int) -> tuple[int, int]:
    """Store the messages of ``queue``'s ``.XQ``; returns how many were stored and how many kept."""
    dead_queue = f"{queue}.XQ"
    moved = 0
    kept: set[str] = set()
    while True:
        method, properties, body = channel.basic_get(dead_queue, auto_ack=False)
        if method is None:
            break
        digest = hashlib.sha256(body).hexdigest()
        if digest in kept:  # round the queue once: what is left was kept back in this sweep
            _give_back(channel, method.delivery_tag)
            break
        try:
            entry_id, dead = _store(conn, body, queue, limit, _first_death(properties))
        except DatabaseUnavailable:
            _give_back(channel, method.delivery_tag)
            raise
        except Exception as e:
            logger.error(
                "cannot store a message from %s (%s), not even raw; it waits at the end of the queue",
                dead_queue,
                type(e).__name__,
            )
            try:
                channel.basic_publish("", dead_queue, body, properties)  # confirmed: durable first
            except BaseException:
                _give_back(channel, method.delivery_tag)
                raise
            channel.basic_ack(method.delivery_tag)
            kept.add(digest)
            continue
        except BaseException:
            _give_back(channel, method.delivery_tag)
            raise
        channel.basic_ack(method.delivery_tag)
        logger.warning("dead-lettered %r from %s: %s", entry_id, dead_queue, dead.reason)
        moved += 1
    return moved, len(kept)


def sweep_forever(settings: Settings, stop: threading.Event, *, interval_s: float = 2.0) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; outages are logged and outlasted.

    Anything else propagates, for the supervisor to restart the sweeper after a delay.
    """
    while not stop.wait(interval_s):
        try:
            sweep_once(settings)
        except (pika.exceptions.AMQPError, OSError, DatabaseUnavailable) as e:
            logger.info("dead-queue sweep skipped: %s", e or type(e).__name__)


def _store(
    conn: Connection, body: bytes, queue: str, limit: int, death: str | None = None
) -> tuple[str, DeadJob]:
    """Store what ``body`` is; when that fails for a reason other than an outage, store it raw.
    ``death`` is RabbitMQ's reason for dead-lettering it. Returns the entry's id and what was stored."""
    try:
        dead = dead_job_of(body, queue, max_body_bytes=limit)
    except Exception as e:  # a bug here must not stop the sweep: keep the bytes, name the error
        logger.exception("cannot read a message from %s.XQ; storing it raw", queue)
        dead = _unreadable(body, queue, limit, e)
    if death == "delivery_limit" and dead.reason == Reason.REJECTED_BY_WORKER:
        dead = replace(
            dead,
            reason=Reason.CRASH_LOOP,
            detail=f"RabbitMQ dead-lettered it after {DELIVERY_LIMIT + 1} deliveries no worker settled"
            " (the quorum queue's x-delivery-limit): it keeps killing workers",
        )
    try:
        return store_dead_job(conn, dead) or dead.id, dead
    except DatabaseUnavailable:
        raise
    except Exception as e:
        with contextlib.suppress(Exception):
            conn.rollback()
        logger.warning(
            "cannot store %r from %s.XQ as read (%s); storing it raw", dead.id, queue, type(e).__name__
        )
        fallback = _unreadable(body, queue, limit, e)
        return store_dead_job(conn, fallback) or fallback.id, fallback


def _first_death(properties: pika.BasicProperties) -> str | None:
    """Why RabbitMQ dead-lettered a message (``x-first-death-reason``: ``rejected``, ``expired``,
    ``delivery_limit`` …), ``None`` when it does not say."""
    reason = (properties.headers or {}).get("x-first-death-reason")
    return reason if isinstance(reason, str) else None


def _give_back(channel: BlockingChannel, tag: int) -> None:
    # When the connection is gone, RabbitMQ requeues what was not acknowledged anyway.
    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
        channel.basic_nack(tag, requeue=True)


def _unreadable(body: bytes, queue: str, limit: int, error: Exception) -> DeadJob:
    return _raw(
        body[:KEPT_PREFIX_BYTES] if len(body) > limit else body,
        queue,
        Reason.INTERNAL_ERROR,
        f"the message could not be read or stored as read ({type(error).__name__}); its raw body is kept",
        entry_id=raw_id(body),
    )


def _raw(body: bytes, queue: str, reason: Reason, detail: str, *, entry_id: str | None = None) -> DeadJob:
    return DeadJob(entry_id or raw_id(body), queue, reason, detail, 1, raw_body=body)


def _message_dead_job(fields: dict[str, Any], queue: str) -> DeadJob:
    """The dead job of a well-formed dramatiq message found in ``queue``'s ``.XQ``."""
    args = fields["args"]
    job: Job | None = None
    if len(args) == 1 and isinstance(args[0], dict):
        try:
            job = Job.model_validate(args[0])
        except (ValidationError, ValueError, RecursionError):
            job = None
    actor = fields["actor_name"]
    if actor not in (SEND_DOCUMENT_ACTOR, SEND_RECEIPT_ACTOR):
        reason, detail = Reason.UNKNOWN_ACTOR, f"no postbote actor is called {_short(repr(actor))}"
    else:
        reason, detail = (
            Reason.REJECTED_BY_WORKER,
            "a worker rejected the message without saying why (see its log)",
        )
    retries = fields["options"].get("retries", 0)
    attempts = retries if isinstance(retries, int) and not isinstance(retries, bool) else 0
    return DeadJob(
        id=str(job.job_id) if job else str(fields["message_id"]),
        # Where it was found, not where it says it belongs: a replay puts it back on this lane.
        queue_name=queue,
        reason=reason,
        detail=detail,
        attempts=min(max(attempts, 0), _MAX_ATTEMPTS),
        job_id=job.job_id if job else _uuid(str(fields["message_id"])),
        tenant=job.tenant if job else None,
        doc_type=job.document.type.value if job else None,
        doc_number=job.document.number if job else None,
        message={**fields, "queue_name": queue},
    )


def _short(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _uuid(value: str) -> UUID | None:
    try:
        return UUID(value)
    except ValueError:
        return None


__all__ = [
    "KEPT_PREFIX_BYTES",
    "UnstoredMessages",
    "dead_job_of",
    "raw_id",
    "sweep_forever",
    "sweep_once",
]
