"""Quorum queues: the worker declares every queue of a lane as the installation's type, with the
dead-letter arguments dramatiq's layout needs; producers publish into either type; a message that
keeps coming back is dead-lettered by RabbitMQ after ``x-delivery-limit`` deliveries; a broker URL
may name several nodes. On the shared RabbitMQ, under this test's own queue prefix."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from producer import publish
from producer.queues import DELIVERY_LIMIT, QueueType, declare_queues, lane_declarations
from schemas.constants import DOCUMENTS_QUEUE, lane_queues, queue_name
from schemas.job import Job
from tests.support.faults import dramatiq_message
from tests.support.ledger import wait_dead
from tests.support.services import BROKER_URL, delete_queues, isolated_settings
from worker.db import Connection
from worker.runtime.broker import make_broker
from worker.runtime.seal import Sealer
from worker.runtime.sweeper import sweep_once
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import free_port


@pytest.fixture
def quorum(settings: Settings) -> Iterator[Settings]:
    own = isolated_settings(settings, queue_type="quorum")
    yield own
    delete_queues(own)


def _channel() -> tuple[pika.BlockingConnection, Any]:
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    return connection, connection.channel()


def declared_type(queue: str) -> QueueType:
    """The type ``queue`` has: RabbitMQ takes a declaration only with the arguments it has."""
    lane = queue.removesuffix(".DQ").removesuffix(".XQ")
    declarations = {t: dict(lane_declarations(lane, t))[queue] for t in ("classic", "quorum")}
    found: list[QueueType] = []
    for queue_type, arguments in declarations.items():
        connection, channel = _channel()
        try:
            channel.queue_declare(queue, durable=True, arguments=arguments)
            found.append(queue_type)
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 406, e
        finally:
            if connection.is_open:
                connection.close()
    assert len(found) == 1, (queue, found)
    return found[0]


def test_a_quorum_worker_declares_both_lanes_with_their_delay_and_dead_queues_as_quorum_queues(
    quorum: Settings,
) -> None:
    broker = make_broker(quorum, lambda *_: None, sealer=Sealer(b"k" * 32))
    try:
        for lane in lane_queues(quorum.queue_prefix):
            broker.declare_queue(lane, ensure=True)
    finally:
        broker.close()
    for lane in lane_queues(quorum.queue_prefix):
        for name in (lane, f"{lane}.DQ", f"{lane}.XQ"):
            assert declared_type(name) == "quorum"


def test_the_producer_publishes_into_queues_of_either_type_and_declares_a_missing_lane_with_its_own(
    quorum: Settings,
) -> None:
    job = Job.model_validate(make_job("acme", "invoice", 1, user_id="u1", to="kunde@example.com"))
    lane = queue_name(quorum.queue_prefix, DOCUMENTS_QUEUE)
    connection, channel = _channel()
    try:
        declare_queues(channel, lane, "quorum")
    finally:
        connection.close()
    # A producer told "classic" finds the workers' quorum queue and only checks it.
    publish([job], broker_url=BROKER_URL, queue_prefix=quorum.queue_prefix, queue_type="classic")

    fresh = isolated_settings(quorum)
    try:
        publish([job], broker_url=BROKER_URL, queue_prefix=fresh.queue_prefix, queue_type="quorum")
        fresh_lane = queue_name(fresh.queue_prefix, DOCUMENTS_QUEUE)
        assert [declared_type(n) for n in (fresh_lane, f"{fresh_lane}.DQ", f"{fresh_lane}.XQ")] == [
            "quorum"
        ] * 3
    finally:
        delete_queues(fresh)
    connection, channel = _channel()
    try:
        assert channel.queue_declare(lane, passive=True).method.message_count == 1
    finally:
        connection.close()


def test_a_message_that_keeps_coming_back_is_dead_lettered_after_the_delivery_limit_and_stored_as_a_crash_loop(
    quorum: Settings, db: Connection
) -> None:
    lane = queue_name(quorum.queue_prefix, DOCUMENTS_QUEUE)
    job = make_job("acme", "invoice", 3, user_id="u1", to="kunde@example.com")
    connection, channel = _channel()
    try:
        declare_queues(channel, lane, "quorum")
        channel.confirm_delivery()
        channel.basic_publish("", lane, dramatiq_message(quorum, job), pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()
    deliveries = 0
    for _ in range(DELIVERY_LIMIT + 5):
        # A worker that dies holding the message: its channel goes away unsettled.
        connection, channel = _channel()
        method, _, _ = channel.basic_get(lane, auto_ack=False)
        connection.close()
        if method is None:
            break
        deliveries += 1
    assert deliveries == DELIVERY_LIMIT + 1
    connection, channel = _channel()
    try:
        method, properties, _ = channel.basic_get(f"{lane}.XQ", auto_ack=False)
        assert properties.headers["x-first-death-reason"] == "delivery_limit"
        channel.basic_nack(method.delivery_tag, requeue=True)
    finally:
        connection.close()

    assert sweep_once(quorum) == 1
    entry = wait_dead(db, job["job_id"])
    assert entry["reason"] == "crash_loop"
    assert "x-delivery-limit" in entry["detail"]


def test_a_broker_url_naming_a_dead_node_first_publishes_to_the_next(quorum: Settings) -> None:
    job = Job.model_validate(make_job("acme", "invoice", 2, user_id="u1", to="kunde@example.com"))
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    ids = publish(
        [job], broker_url=f"{dead};{BROKER_URL}", queue_prefix=quorum.queue_prefix, queue_type="quorum"
    )
    assert ids == [job.job_id]
