"""Hostile or broken messages on the queue: publish them raw, then prove the lanes still work."""

from __future__ import annotations

import time
from typing import Any

import pika

from producer.queues import declare_queues
from schemas.constants import DOCUMENTS_QUEUE, queue_name
from tests.support.ledger import wait_final
from tests.support.services import send_jobs
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job


def publish_raw_message(
    settings: Settings,
    body: bytes,
    *,
    lane: str = DOCUMENTS_QUEUE,
    queue: str | None = None,
    properties: pika.BasicProperties | None = None,
    broker_url: str | None = None,
) -> None:
    """Publish ``body`` with pika, persistent and confirmed, to a lane's queue (or any ``queue``),
    with the AMQP ``properties`` given (e.g. ``user_id``)."""
    target = queue or queue_name(settings.queue_prefix, lane)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url or settings.broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_queues(channel, queue_name(settings.queue_prefix, lane))
        props = properties or pika.BasicProperties()
        props.delivery_mode = 2
        channel.basic_publish("", target, body, props)
    finally:
        connection.close()


def assert_lanes_still_work(
    settings: Settings, db: Connection, tenant: str, *, within_s: float = 30
) -> dict[str, dict[str, Any]]:
    """Send a normal invoice (bulk lane) and a normal receipt (receipts lane) of ``tenant``, whose
    employee ``u1`` exists, and assert both end ``sent`` within ``within_s`` seconds."""
    number = int(time.time() * 1000) % 10**6
    invoice = make_job(tenant, "invoice", number, user_id="u1", to="kunde@example.com")
    receipt = make_job(tenant, "receipt", number, user_id="u1", to="gast@example.com")
    ids = send_jobs(settings, [invoice, receipt])
    rows = wait_final(db, ids, timeout=within_s)
    assert {r["status"] for r in rows.values()} == {"sent"}, rows
    return rows


__all__ = ["assert_lanes_still_work", "publish_raw_message"]
