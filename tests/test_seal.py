"""A worker's seal covers exactly the message it sealed, with a key all workers of an installation
share, and every message a worker's broker enqueues carries one."""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pika
import pytest

from schemas.constants import DOCUMENTS_QUEUE, queue_name
from worker.db import Connection
from worker.runtime.broker import make_broker
from worker.runtime.seal import KEY_NAME, SEAL, Sealer, SealingFailed, load_seal_key
from worker.settings import Settings


def a_message(**fields: Any) -> dramatiq.Message[Any]:
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="pb.documents",
        actor_name="send_document",
        args=({"job_id": "4f6c…", "subject": "Rechnung RE-1 – für Müller", "amount": 12.5},),
        kwargs={},
        options={"retries": 1, "requeues": 2, "publisher": "erp-acme", "eta": 1_700_000_000_000},
    )
    return message.copy(**fields)


def as_received(message: dramatiq.Message[Any], sealer: Sealer) -> dict[str, Any]:
    """The fields a consumer decodes from the sealed message's body."""
    message.options[SEAL] = sealer.seal(message)
    fields: dict[str, Any] = json.loads(message.encode())
    return fields


def verifies(sealer: Sealer, fields: dict[str, Any]) -> bool:
    return sealer.verify(
        fields["message_id"], fields["message_timestamp"], fields["options"], fields["args"], fields["kwargs"]
    )


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(secrets.token_bytes(32))


def test_a_sealed_message_verifies_after_the_round_trip_through_json(sealer: Sealer) -> None:
    assert verifies(sealer, as_received(a_message(), sealer))


def test_the_seal_does_not_depend_on_the_order_of_the_options(sealer: Sealer) -> None:
    fields = as_received(a_message(), sealer)
    fields["options"] = dict(reversed(list(fields["options"].items())))
    assert verifies(sealer, fields)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("options", lambda o: {**o, "retries": 0}),
        ("options", lambda o: {**o, "eta": 4_102_444_800_000}),
        ("options", lambda o: {**o, "time_limit": 1}),
        ("options", lambda o: {k: v for k, v in o.items() if k != "requeues"}),
        ("options", lambda o: {**o, "publisher": "erp-other"}),
        ("args", lambda a: [{**a[0], "subject": "Mahnung"}]),
        ("kwargs", lambda k: {"extra": 1}),
        ("message_id", lambda m: m + "0"),
        ("message_timestamp", lambda t: t + 1),
    ],
)
def test_a_seal_does_not_cover_a_changed_message(sealer: Sealer, field: str, change: Any) -> None:
    fields = as_received(a_message(), sealer)
    fields[field] = change(fields[field])
    assert not verifies(sealer, fields)


def test_a_seal_of_another_key_or_no_seal_does_not_verify(sealer: Sealer) -> None:
    fields = as_received(a_message(), Sealer(secrets.token_bytes(32)))
    assert not verifies(sealer, fields)
    del fields["options"][SEAL]
    assert not verifies(sealer, fields)
    fields["options"][SEAL] = ["not", "a", "string"]
    assert not verifies(sealer, fields)


def test_a_seal_moved_to_another_job_does_not_verify(sealer: Sealer) -> None:
    first = as_received(a_message(), sealer)
    second = as_received(a_message(args=({"job_id": "other"},)), sealer)
    second["options"][SEAL] = first["options"][SEAL]
    assert not verifies(sealer, second)


def test_workers_starting_together_agree_on_one_key(settings: Settings, db: Connection) -> None:
    name = f"test-{uuid.uuid4().hex}"  # the run's workers keep theirs
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        keys.append(load_seal_key(settings.database_url, name))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8
    assert len(set(keys)) == 1
    assert len(keys[0]) == 32
    assert load_seal_key(settings.database_url, name) == keys[0]
    assert db.execute("SELECT count(*) AS n FROM worker_keys WHERE name = %s", (name,)).fetchone() == {"n": 1}
    db.execute("DELETE FROM worker_keys WHERE name = %s", (name,))


def test_the_installation_key_is_the_one_every_worker_reads(settings: Settings, db: Connection) -> None:
    key = load_seal_key(settings.database_url)
    row = db.execute("SELECT key FROM worker_keys WHERE name = %s", (KEY_NAME,)).fetchone()
    assert row is not None and bytes(row["key"]) == key


@pytest.fixture
def lane_broker(own_queues: Settings) -> Iterator[tuple[dramatiq.Broker, Sealer, str]]:
    sealer = Sealer(secrets.token_bytes(32))
    broker = make_broker(own_queues, lambda *_: None, sealer=sealer)
    yield broker, sealer, queue_name(own_queues.queue_prefix, DOCUMENTS_QUEUE)
    broker.close()


def _take(settings: Settings, queue: str) -> dict[str, Any]:
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        method, _, body = connection.channel().basic_get(queue, auto_ack=True)
        assert method is not None, f"nothing on {queue}"
        fields: dict[str, Any] = json.loads(body)
        return fields
    finally:
        connection.close()


def test_a_delayed_message_is_sealed_with_its_eta_and_delay_queue(
    own_queues: Settings, lane_broker: tuple[dramatiq.Broker, Sealer, str]
) -> None:
    broker, sealer, queue = lane_broker
    broker.enqueue(a_message(queue_name=queue, options={"eta": None}), delay=60_000)
    fields = _take(own_queues, f"{queue}.DQ")
    assert fields["queue_name"] == f"{queue}.DQ"
    assert isinstance(fields["options"]["eta"], int)
    assert verifies(sealer, fields)


def test_a_message_enqueued_without_delay_is_sealed_too(
    own_queues: Settings, lane_broker: tuple[dramatiq.Broker, Sealer, str]
) -> None:
    broker, sealer, queue = lane_broker
    broker.enqueue(a_message(queue_name=queue))
    fields = _take(own_queues, queue)
    assert "eta" in fields["options"] and verifies(sealer, fields)


def test_a_message_that_cannot_be_sealed_is_not_enqueued(
    lane_broker: tuple[dramatiq.Broker, Sealer, str],
) -> None:
    broker, _, queue = lane_broker
    with pytest.raises(SealingFailed):
        broker.enqueue(a_message(queue_name=queue, options={"outcome": object()}))
