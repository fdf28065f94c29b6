"""Republishes parked jobs when they are due, and ends parked jobs whose ``expires_at`` passed.

The supervisor of each ``postbote worker`` runs ``Releaser.run`` in a thread. It releases the jobs
parked from its own queues (``POSTBOTE_QUEUE_PREFIX``), taken with ``SKIP LOCKED``, so the
releasers of several hosts share the work. A job is marked
released in one transaction and published, sealed and confirmed, after it commits: a releaser
that dies in between leaves the mark, and the job is released again after ten minutes if no
worker has claimed it by then. A job published twice is still sent once (the ledger's claim).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from contextlib import suppress
from typing import Any

import dramatiq
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from producer.queues import declare_queues
from schemas.constants import lane_queues
from worker.db import Connection, connect, translated_errors
from worker.errors import BrokerUnavailable, DatabaseUnavailable
from worker.job.parking import DueJob, expire_parked, take_due, unrelease
from worker.runtime.probes import broker_parameters
from worker.runtime.seal import SEAL, Sealer, load_seal_key
from worker.settings import Settings

logger = logging.getLogger(__name__)

BATCH = 500
"""Most jobs released in one transaction."""


class Releaser:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sealer: Sealer | None = None
        self._conn: Connection | None = None
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._queues = list(lane_queues(settings.queue_prefix))
        self._queue_type = settings.queue_type

    def release_once(self) -> int:
        """Release what is due now (at most ``BATCH``) and expire what expired; returns how many
        were released.

        Raises:
          DatabaseUnavailable, BrokerUnavailable: an outage; nothing is lost (see the module).
        """
        conn = self._db()
        with translated_errors():
            with conn.transaction():
                expired = expire_parked(conn)
            if expired:
                logger.info("%d parked jobs expired", expired)
            with conn.transaction():
                due = take_due(conn, self._queues, lead_ms=self._settings.series_park_after_ms, limit=BATCH)
        for n, job in enumerate(due):
            try:
                self._publish(job)
            except BrokerUnavailable:
                with suppress(DatabaseUnavailable), translated_errors(), conn.transaction():
                    unrelease(conn, [j.job_id for j in due[n:]])
                raise
        return len(due)

    def run(self, stop: threading.Event) -> None:
        """Release every ``release_interval_ms`` (at once again after a full batch) until ``stop``."""
        try:
            while not stop.is_set():
                try:
                    released = self.release_once()
                except (DatabaseUnavailable, BrokerUnavailable) as e:
                    logger.warning("releaser: %s", e)
                    self.close()
                    released = 0
                if released < BATCH and stop.wait(self._settings.release_interval_ms / 1000):
                    return
        finally:
            self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                conn.close()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with suppress(pika.exceptions.AMQPError, OSError):
                connection.close()

    def _db(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(
                self._settings.database_url,
                autocommit=True,
                statement_timeout_ms=self._settings.statement_timeout_ms,
            )
        if self._sealer is None:
            self._sealer = Sealer(load_seal_key(self._settings.database_url))
        return self._conn

    def _publish(self, job: DueJob) -> None:
        assert self._sealer is not None
        message: dramatiq.Message[Any] = dramatiq.Message.decode(job.message)
        options = {k: v for k, v in message.options.items() if k != SEAL}
        message = dataclasses.replace(message, options=options)
        message.options[SEAL] = self._sealer.seal(message)
        try:
            channel = self._open()
            channel.basic_publish(
                "", job.queue, message.encode(), pika.BasicProperties(delivery_mode=2), mandatory=True
            )
        except (pika.exceptions.AMQPError, OSError) as e:
            self.close()
            raise BrokerUnavailable(
                f"cannot republish parked job {job.job_id}: {e or type(e).__name__}"
            ) from e

    def _open(self) -> BlockingChannel:
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._connection = pika.BlockingConnection(
                broker_parameters(self._settings.broker_url, timeout_s=10)
            )
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            for queue in self._queues:
                # RabbitMQ may have lost the queues the jobs were parked from.
                declare_queues(self._channel, queue, self._queue_type)
        return self._channel


__all__ = ["Releaser"]
