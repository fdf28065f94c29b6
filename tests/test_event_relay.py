"""The event relay publishes the outbox to ``<prefix>.events``: every event, in order, with its routing
key and body; once with two relays at once; at least once, with the same ``event_id``, when one is
killed mid-batch; it outlasts a broker it cannot reach and deletes what the retention allows."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from schemas.constants import (
    METRIC_EVENTS_LAG_SECONDS,
    METRIC_EVENTS_PUBLISHED,
    METRIC_THREAD_RESTARTS,
    events_exchange,
)
from schemas.event import Event
from tests.support.events import emit, new_job
from tests.support.faults import worker_children
from tests.support.observe import metrics_when, sample, wait_for
from tests.support.services import (
    RunningWorker,
    database_url,
    delete_queues,
    isolated_settings,
)
from worker.db import Connection, connect, drop_database, ensure_database, upgrade
from worker.runtime.relay import BATCH_SIZE, EventRelay
from worker.settings import Settings
from worker.testbed.sink import free_port

Message = tuple[str, pika.BasicProperties, dict[str, Any]]


@pytest.fixture(scope="module")
def outbox_url() -> Iterator[str]:
    """A database of this module's own: a relay publishes every event of its database, so the
    relays of other tests' workers must not share it."""
    url = database_url(f"postbote_events_{uuid.uuid4().hex[:10]}")
    ensure_database(url)
    with connect(url) as conn:
        upgrade(conn)
    yield url
    drop_database(url)


@pytest.fixture
def relayed(settings: Settings, outbox_url: str) -> Iterator[Settings]:
    """Settings with this module's database (its outbox emptied) and a queue prefix of this test's own."""
    with connect(outbox_url, autocommit=True) as conn:
        conn.execute("TRUNCATE events, deliveries, delivery_recipients, delivery_attempts CASCADE")
    own = isolated_settings(settings, database_url=outbox_url)
    yield own
    delete_queues(own)


@pytest.fixture
def outbox(relayed: Settings) -> Iterator[Connection]:
    with connect(relayed.database_url, autocommit=True) as conn:
        yield conn


class Listener:
    """A queue bound to ``<prefix>.events`` with ``binding``; deleted (with the exchange) on close."""

    def __init__(self, settings: Settings, binding: str = "#") -> None:
        self.exchange = events_exchange(settings.queue_prefix)
        self._connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
        self._channel: BlockingChannel = self._connection.channel()
        self._channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        self.queue = self._channel.queue_declare("", exclusive=True).method.queue
        self._channel.queue_bind(self.queue, self.exchange, routing_key=binding)

    def take(self, count: int, timeout: float = 30, *, exactly: bool = True) -> list[Message]:
        """``count`` messages, and any arriving within a moment after them (which fail the test
        unless not ``exactly``)."""
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(messages) < count:
            assert time.monotonic() < deadline, f"{len(messages)} of {count} events arrived"
            messages += self.drain() or []
            time.sleep(0.05)
        time.sleep(0.3)
        messages += self.drain()
        assert len(messages) == count or not exactly, f"{len(messages)} events, not {count}"
        return messages

    def drain(self) -> list[Message]:
        messages: list[Message] = []
        while True:
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((method.routing_key, properties, json.loads(body)))

    def close(self) -> None:
        self._channel.exchange_delete(self.exchange)
        self._connection.close()


@pytest.fixture
def listen(relayed: Settings) -> Iterator[Any]:
    listeners: list[Listener] = []

    def start(binding: str = "#") -> Listener:
        listener = Listener(relayed, binding)
        listeners.append(listener)
        return listener

    yield start
    for listener in reversed(listeners):
        listener.close()


def outbox_rows(conn: Connection) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM events ORDER BY id").fetchall()


def expected_body(row: dict[str, Any]) -> dict[str, Any]:
    """The event a consumer should get for an outbox row."""
    return {
        **row["body"],
        "event_id": str(row["event_id"]),
        "seq": row["seq"],
        "type": row["type"],
        "occurred_at": row["occurred_at"],
    }


def wait_published(conn: Connection, timeout: float = 60) -> None:
    wait_for(
        lambda: (
            conn.execute("SELECT count(*) AS n FROM events WHERE published_at IS NULL").fetchone()["n"]  # type: ignore[index]
            == 0
        ),
        timeout=timeout,
        what="every event published",
    )


def _ready_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker\.runtime\.process\[(\d+)\] worker process ready", output)]


def test_the_relay_publishes_each_event_in_order_with_its_routing_key_and_body(
    relayed: Settings, outbox: Connection, listen: Any
) -> None:
    everything, invoices = listen("#"), listen("acme.invoice.#")
    running = RunningWorker(relayed, processes=1, threads=1)
    try:
        first = new_job(outbox, "acme")
        second = new_job(outbox, "globex", "offer", "AN-7")
        third = new_job(outbox, "acme", "offer", "AN-8")
        emit(outbox, first, "retrying", "retrying", "smtp_temporary")
        emit(outbox, second, "failed", "failed", "sender_not_permitted")
        emit(outbox, first, "sent", "sent")
        emit(outbox, second, "dead", "failed", "sender_not_permitted")
        emit(outbox, third, "partial", "partial")

        messages = everything.take(5)
        rows = outbox_rows(outbox)
        assert [m[2]["event_id"] for m in messages] == [str(r["event_id"]) for r in rows]
        assert [m[0] for m in messages] == [
            "acme.invoice.retrying",
            "globex.offer.failed",
            "acme.invoice.sent",
            "globex.offer.dead",
            "acme.offer.partial",
        ]
        for (_, properties, body), row in zip(messages, rows, strict=True):
            event = Event.model_validate(body)
            assert set(body) == set(Event.model_fields)
            assert event.model_dump() == Event.model_validate(expected_body(row)).model_dump()
            assert properties.message_id == body["event_id"]
            assert properties.type == body["type"]
            assert properties.content_type == "application/json"
            assert properties.delivery_mode == 2
        sent = messages[2][2]
        assert (sent["job_id"], sent["seq"], sent["status"], sent["tenant"]) == (first, 2, "sent", "acme")
        assert sent["document"] == {"type": "invoice", "number": "RE-2026-0001"}
        assert sent["recipients"] == [
            {"address": "kunde@example.com", "role": "to", "state": "pending", "reply": None}
        ]
        assert [m[2]["type"] for m in invoices.take(2)] == ["retrying", "sent"]
        assert all(r["published_at"] is not None for r in outbox_rows(outbox))

        text = wait_for(
            lambda: metrics_when(
                running.metrics_port, lambda t: sample(t, METRIC_EVENTS_LAG_SECONDS + "_count") == 5
            ),
            what="five lags observed",
        )
        assert sample(text, METRIC_EVENTS_PUBLISHED, type="sent") == 1
        assert sample(text, METRIC_EVENTS_PUBLISHED, type="dead") == 1
        assert sample(text, METRIC_EVENTS_PUBLISHED, type="cancelled") == 0
        assert sample(text, METRIC_EVENTS_LAG_SECONDS + "_bucket", le="+Inf") == 5
        assert sample(text, METRIC_THREAD_RESTARTS, thread="event_relay") == 0
    finally:
        running.stop()


def test_two_relays_at_once_publish_every_event_once_and_each_job_in_seq_order(
    relayed: Settings, outbox: Connection, listen: Any
) -> None:
    listener = listen()
    # Few jobs with many events each, in small batches: the two relays claim events of the same
    # jobs at once (interleaved, too), so each meets jobs whose earlier events the other holds.
    jobs = [new_job(outbox, "acme", number=f"RE-{n}") for n in range(4)]
    for _ in range(25):
        for job in jobs:
            emit(outbox, job, "retrying", "retrying")
    stop = threading.Event()
    relays = [EventRelay(relayed, batch_size=7, idle_poll_s=0.01) for _ in range(2)]
    threads = [threading.Thread(target=r.run, args=(stop,)) for r in relays]
    for thread in threads:
        thread.start()
    try:
        for _ in range(25):
            for job in jobs:
                emit(outbox, job, "retrying", "retrying")
        wait_published(outbox)
        messages = listener.take(200)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    ids = [m[2]["event_id"] for m in messages]
    assert sorted(ids) == sorted(str(r["event_id"]) for r in outbox_rows(outbox))
    by_job: dict[str, list[int]] = defaultdict(list)
    for _, _, body in messages:
        by_job[body["job_id"]].append(body["seq"])
    assert by_job == {job: list(range(1, 51)) for job in jobs}
    published = [
        sum(s.value for f in r.metrics.collect() for s in f.samples if s.name == METRIC_EVENTS_PUBLISHED)
        for r in relays
    ]
    assert sum(published) == 200


def test_a_job_whose_earlier_event_another_relay_holds_waits_for_it(
    relayed: Settings, outbox: Connection, listen: Any
) -> None:
    listener = listen()
    held, other = new_job(outbox, "acme", number="RE-1"), new_job(outbox, "acme", number="RE-2")
    emit(outbox, held, "retrying", "retrying")
    emit(outbox, other, "retrying", "retrying")
    emit(outbox, held, "sent", "sent")
    relay = EventRelay(relayed)
    with connect(relayed.database_url) as another_relay:
        another_relay.execute("SELECT id FROM events WHERE job_id = %s AND seq = 1 FOR UPDATE", (held,))
        assert relay.relay_once() == 1
        assert [(m[2]["job_id"], m[2]["seq"]) for m in listener.take(1)] == [(other, 1)]
    assert relay.relay_once() == 2
    assert [(m[2]["job_id"], m[2]["seq"]) for m in listener.take(2)] == [(held, 1), (held, 2)]
    relay.close()


def test_events_claimed_by_a_killed_relay_go_out_again_with_the_same_event_id(
    relayed: Settings, outbox: Connection, listen: Any
) -> None:
    listener = listen()
    outbox.execute(
        "INSERT INTO deliveries (job_id, tenant_id, doc_type, doc_number, payload_sha256, status)"
        " SELECT gen_random_uuid(), 'acme', 'invoice', 'RE-' || n, 'test', 'retrying'"
        " FROM generate_series(1, 700) AS n"
    )
    for _ in range(2):
        outbox.execute("SELECT postbote_emit_event(job_id, 'retrying') FROM deliveries")
    # A share lock on the table lets the relay claim and publish its first batch, but holds back
    # its UPDATE of published_at: the relay is caught between the confirms and its commit.
    with connect(relayed.database_url) as blocker:
        blocker.execute("LOCK TABLE events IN SHARE MODE")
        running = RunningWorker(relayed, processes=1, threads=1)
        try:
            wait_for(lambda: _ready_pids(running.output()), what="a worker process")
            before = listener.take(BATCH_SIZE)
            children = worker_children(running.process.pid)
            running.process.kill()
            running.process.wait(30)
            for pid in children:
                os.kill(pid, signal.SIGKILL)
        finally:
            running.stop()
        blocker.rollback()
    in_flight = {m[2]["event_id"] for m in before}
    unpublished = outbox.execute("SELECT event_id FROM events WHERE published_at IS NULL").fetchall()
    assert len(unpublished) == 1400
    assert in_flight <= {str(r["event_id"]) for r in unpublished}

    again = RunningWorker(relayed, processes=1, threads=1)
    try:
        wait_published(outbox)
        after = listener.take(1400)
    finally:
        again.stop()
    received = Counter(m[2]["event_id"] for m in before + after)
    assert set(received) == {str(r["event_id"]) for r in outbox_rows(outbox)}
    assert {event_id for event_id, n in received.items() if n > 1} == in_flight
    assert max(received.values()) == 2
    first_copy = {m[2]["event_id"]: (m[0], m[2]) for m in before}
    for routing_key, properties, body in after:
        if body["event_id"] in in_flight:
            assert (routing_key, body) == first_copy[body["event_id"]]
            assert properties.message_id == body["event_id"]
    seqs: dict[str, list[int]] = defaultdict(list)
    for _, _, body in after:
        seqs[body["job_id"]].append(body["seq"])
    assert all(s == sorted(s) for s in seqs.values())


def test_a_relay_that_cannot_reach_the_broker_keeps_the_events_and_publishes_them_later(
    relayed: Settings, outbox: Connection, listen: Any, caplog: pytest.LogCaptureFixture
) -> None:
    listener = listen()
    job = new_job(outbox, "acme")
    emit(outbox, job, "sent", "sent")
    unreachable = relayed.model_copy(update={"broker_url": f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"})
    stop = threading.Event()
    relay = EventRelay(unreachable)
    thread = threading.Thread(target=relay.run, args=(stop,))
    thread.start()
    try:
        time.sleep(2)
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(30)
    assert "the events wait in the outbox, retrying" in caplog.text
    [row] = outbox_rows(outbox)
    assert row["published_at"] is None

    relay = EventRelay(relayed)
    assert relay.relay_once() == 1
    relay.close()
    [(routing_key, _, body)] = listener.take(1)
    assert (routing_key, body["event_id"]) == ("acme.invoice.sent", str(row["event_id"]))


def test_retention_deletes_only_published_events_older_than_the_retention(
    relayed: Settings, outbox: Connection
) -> None:
    jobs = [new_job(outbox, "acme", number=f"RE-{n}") for n in range(3)]
    for job in jobs:
        emit(outbox, job, "sent", "sent")
    old_published, old_unpublished, recent = jobs
    outbox.execute(
        "UPDATE events SET occurred_at = now() - interval '20 days', published_at = now() WHERE job_id = %s",
        (old_published,),
    )
    outbox.execute(
        "UPDATE events SET occurred_at = now() - interval '20 days' WHERE job_id = %s", (old_unpublished,)
    )
    outbox.execute("UPDATE events SET published_at = now() WHERE job_id = %s", (recent,))

    relay = EventRelay(relayed.model_copy(update={"events_retention_days": 14}))
    try:
        assert relay.delete_expired() == 1
        assert relay.delete_expired() == 0
    finally:
        relay.close()
    assert {str(r["job_id"]) for r in outbox_rows(outbox)} == {old_unpublished, recent}
    forever = EventRelay(relayed.model_copy(update={"events_retention_days": 0}))
    outbox.execute("UPDATE events SET published_at = now()")
    assert forever.delete_expired() == 0
    forever.close()
