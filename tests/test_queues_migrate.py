"""``postbote queues migrate`` on this machine's RabbitMQ: refused while a publisher is sending
(RabbitMQ may confirm and drop a message sent to a queue while it is deleted), nothing lost either
way, and once the publishers are quiet every queue changes type with its messages and their
properties. The migration under load on a cluster is in ``tests/test_ha_migrate.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest

from producer.queues import QueueType, broker_parameters, lane_declarations
from schemas.constants import lane_queues
from tests.support.services import postbote
from worker.settings import Settings
from worker.tools.queues import MIGRATING_SUFFIX, MigrationRefused, migrate_queues

QUEUED = 40


class Publisher:
    """Sends to ``queue`` with confirms, five at a time, until stopped; counts what was confirmed."""

    def __init__(self, settings: Settings, queue: str) -> None:
        self.settings, self.queue = settings, queue
        self.confirmed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection = pika.BlockingConnection(broker_parameters(self.settings.broker_url))
        channel = connection.channel()
        channel.confirm_delivery()
        while not self._stop.wait(0.02):
            for _ in range(5):
                try:
                    channel.basic_publish(
                        "", self.queue, b"later", pika.BasicProperties(delivery_mode=2), mandatory=True
                    )
                    self.confirmed += 1
                except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
                    pass
        connection.close()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.confirmed


@pytest.fixture
def classic_lanes(own_queues: Settings) -> Iterator[Settings]:
    """The lanes of ``own_queues`` declared as classic queues, ``QUEUED`` messages in the documents queue."""
    with pika.BlockingConnection(broker_parameters(own_queues.broker_url)) as connection:
        channel = connection.channel()
        for lane in lane_queues(own_queues.queue_prefix):
            for name, arguments in lane_declarations(lane, "classic"):
                channel.queue_declare(name, durable=True, arguments=arguments)
        for n in range(QUEUED):
            properties = pika.BasicProperties(delivery_mode=2, message_id=f"m{n}", headers={"n": n})
            channel.basic_publish("", documents(own_queues), f"job {n}".encode(), properties)
    yield own_queues
    with pika.BlockingConnection(broker_parameters(own_queues.broker_url)) as connection:
        channel = connection.channel()
        for lane in lane_queues(own_queues.queue_prefix):
            for name, _ in lane_declarations(lane, "classic"):
                channel.queue_delete(name + MIGRATING_SUFFIX)


def documents(settings: Settings) -> str:
    return lane_queues(settings.queue_prefix)[0]


def state(settings: Settings) -> dict[str, tuple[QueueType, int]]:
    """Each queue of both lanes (and any temporary queue left): its type and its messages."""
    found: dict[str, tuple[QueueType, int]] = {}
    with pika.BlockingConnection(broker_parameters(settings.broker_url)) as connection:
        for lane in lane_queues(settings.queue_prefix):
            for name, quorum_arguments in lane_declarations(lane, "quorum"):
                for each in (name, name + MIGRATING_SUFFIX):
                    channel = connection.channel()
                    try:
                        count = channel.queue_declare(each, passive=True).method.message_count
                        channel.queue_declare(each, durable=True, arguments=quorum_arguments)
                        found[each] = ("quorum", count)
                    except pika.exceptions.ChannelClosedByBroker as e:
                        if e.reply_code == 406:
                            found[each] = ("classic", count)
    return found


def test_a_sending_publisher_is_refused_and_loses_nothing(classic_lanes: Settings) -> None:
    publisher = Publisher(classic_lanes, documents(classic_lanes))
    try:
        time.sleep(0.3)
        with pytest.raises(MigrationRefused, match="stop every publisher") as refused:
            migrate_queues(classic_lanes.broker_url, classic_lanes.queue_prefix, "quorum", quiet_s=60)
        assert documents(classic_lanes) in str(refused.value)
    finally:
        confirmed = publisher.stop()
    after = state(classic_lanes)
    assert {kind for kind, _ in after.values()} == {"classic"}
    assert not [name for name in after if name.endswith(MIGRATING_SUFFIX)]
    assert after[documents(classic_lanes)][1] == QUEUED + confirmed


def test_quiet_queues_change_type_with_every_message_and_its_properties(classic_lanes: Settings) -> None:
    lines: list[str] = []
    reports = migrate_queues(
        classic_lanes.broker_url, classic_lanes.queue_prefix, "quorum", quiet_s=0.2, progress=lines.append
    )
    assert lines[0].startswith("watching 6 queue(s) for 0.2 s")
    assert {r.name: r.moved for r in reports if r.moved} == {documents(classic_lanes): QUEUED}
    after = state(classic_lanes)
    assert {kind for kind, _ in after.values()} == {"quorum"}
    assert not [name for name in after if name.endswith(MIGRATING_SUFFIX)]
    with pika.BlockingConnection(broker_parameters(classic_lanes.broker_url)) as connection:
        channel = connection.channel()
        got = [channel.basic_get(documents(classic_lanes), auto_ack=True) for _ in range(QUEUED)]
    # A quorum queue adds its delivery count.
    assert [(p.message_id, p.headers["n"], body) for _, p, body in got] == [
        (f"m{n}", n, f"job {n}".encode()) for n in range(QUEUED)
    ]


def test_the_command_names_the_publishers_and_a_bad_quiet_time(classic_lanes: Settings) -> None:
    publisher = Publisher(classic_lanes, documents(classic_lanes))
    try:
        time.sleep(0.3)
        refused = postbote(classic_lanes, "queues", "migrate", "--to", "quorum", "--quiet-seconds", "60")
    finally:
        publisher.stop()
    assert refused.returncode == 1, refused
    assert "stop every publisher" in refused.stderr and "nothing was changed" in refused.stderr
    assert "Traceback" not in refused.stderr
    bad = postbote(classic_lanes, "queues", "migrate", "--to", "quorum", "--quiet-seconds", "soon")
    assert bad.returncode == 2 and "'soon' is not a number of seconds" in bad.stderr, bad
