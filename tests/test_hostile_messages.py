"""Messages published raw by anyone with publish rights on the vhost: whatever the body names or
carries, each ends sent once, or recorded with a reason, and both lanes keep sending.

The worker-owned parts of a message are not the publisher's to set: the queue and actor are
those of the queue consumed, options count only with a worker's seal, a timestamp from the
future counts as now, the publisher is the ``user_id`` RabbitMQ checked, and a body too large
to read is rejected unread.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.constants import DOCUMENTS_QUEUE, RECEIPTS_QUEUE, actor_of, queue_name
from tests.support.faults import copies_received, dramatiq_message, worker_children
from tests.support.hostile import assert_lanes_still_work, publish_raw_message
from tests.support.ledger import wait_dead, wait_final
from tests.support.observe import http_get, wait_for
from tests.support.services import RunningWorker, delete_queues, isolated_settings
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import RecipientRules

FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01
BROKER_USER = "guest"
"""The RabbitMQ user of the test broker: the only ``user_id`` RabbitMQ accepts from our connections."""


@pytest.fixture(scope="module")
def lanes(settings: Settings) -> Iterator[Settings]:
    """Queues of their own and quick retries."""
    own = isolated_settings(settings, min_backoff_ms=100, max_backoff_ms=400)
    yield own
    delete_queues(own)


@pytest.fixture(scope="module")
def hostile_worker(lanes: Settings) -> Iterator[RunningWorker]:
    """Two bulk threads: two messages that killed a thread each would stop the bulk lane."""
    running = RunningWorker(lanes, processes=1, threads=2)
    yield running
    running.stop()


def an_invoice(tenant: str, **changes: Any) -> dict[str, Any]:
    job = make_job(tenant, "invoice", int(time.time() * 1000) % 10**5, user_id="u1", to="kunde@example.com")
    job.update(changes)
    return job


def a_receipt(tenant: str) -> dict[str, Any]:
    return make_job(tenant, "receipt", int(time.time() * 1000) % 10**5, user_id="u1", to="gast@example.com")


def body_of(settings: Settings, job: dict[str, Any], **fields: Any) -> bytes:
    """A dramatiq message carrying ``job``, with ``fields`` of the envelope replaced."""
    return dramatiq_message(settings, job, **fields)


def metric_total(worker: RunningWorker, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` the worker exports (0 when it has none yet)."""
    status, text = http_get(worker.metrics_port, "/metrics")
    assert status == 200
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def assert_no_possible_duplicates(db: Connection, worker: RunningWorker, job_ids: list[str]) -> None:
    rows = db.execute(
        "SELECT job_id::text AS job_id, takeovers FROM deliveries WHERE job_id = ANY(%s::uuid[])", (job_ids,)
    ).fetchall()
    assert all(r["takeovers"] == 0 for r in rows), rows
    assert metric_total(worker, "postbote_possible_duplicates_total") == 0


def assert_sent_once(db: Connection, sink: Sink, job_ids: list[str], *, timeout: float = 30) -> None:
    rows = wait_final(db, job_ids, timeout=timeout)
    assert {r["status"] for r in rows.values()} == {"sent"}, rows
    time.sleep(0.3)  # a late second copy would have arrived by now
    copies = copies_received(sink.handler)
    for job_id in job_ids:
        mine = {rcpt: n for (job, rcpt), n in copies.items() if job == job_id}
        assert mine and set(mine.values()) == {1}, (job_id, mine)


def dead_entry(db: Connection, job_id: str) -> dict[str, Any]:
    entry = wait_dead(db, job_id)
    assert entry["reason"], entry
    return entry


# 1. The queue and the actor are those of the queue consumed.

ROUTES: dict[str, Callable[[Settings], dict[str, str]]] = {
    "the other lane's queue": lambda s: {"queue_name": queue_name(s.queue_prefix, RECEIPTS_QUEUE)},
    "its own delay queue": lambda s: {"queue_name": queue_name(s.queue_prefix, DOCUMENTS_QUEUE) + ".DQ"},
    "the queue of another prefix": lambda s: {"queue_name": "someone-else.documents"},
    "a queue nobody has": lambda s: {"queue_name": "\u2603.XQ"},
    "the other lane's actor": lambda s: {"actor_name": actor_of(RECEIPTS_QUEUE)},
    "an actor postbote does not have": lambda s: {"actor_name": "launch_rockets"},
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_body_naming_another_queue_or_actor_is_processed_as_a_message_of_its_lane(
    route: str,
    lanes: Settings,
    hostile_worker: RunningWorker,
    sink: Sink,
    make_tenant: Callable[..., str],
    db: Connection,
) -> None:
    tenant = make_tenant()
    # More forged messages than the bulk lane has threads: each once killed the thread it ran on.
    invoices = [an_invoice(tenant, to=[f"kunde{n}@example.com"]) for n in range(3)]
    for job in invoices:
        publish_raw_message(lanes, body_of(lanes, job, **ROUTES[route](lanes)))
    receipt = a_receipt(tenant)
    documents = {"queue_name": queue_name(lanes.queue_prefix, DOCUMENTS_QUEUE), "actor_name": "send_document"}
    publish_raw_message(lanes, body_of(lanes, receipt, **documents), lane=RECEIPTS_QUEUE)

    forged = [j["job_id"] for j in [*invoices, receipt]]
    assert_sent_once(db, sink, forged)
    lanes_ok = assert_lanes_still_work(lanes, db, tenant, within_s=30)
    assert_no_possible_duplicates(db, hostile_worker, [*forged, *lanes_ok])
    assert hostile_worker.process.poll() is None


# 2. Worker-owned options count only with a worker's seal.


def forged_outcome(job: dict[str, Any]) -> dict[str, Any]:
    """An outcome as a worker carries it when the ledger is down, claiming the job was sent."""
    address = job["to"][0]
    fate = {
        "address": address,
        "role": "to",
        "state": "accepted",
        "code": 250,
        "enhanced": "2.0.0",
        "text": "OK",
        "attempts": 1,
    }
    return {
        "job_id": job["job_id"],
        "attempt": 1,
        "started_at": time.time(),
        "duration_ms": 3,
        "worker": "forger",
        "tried": [address],
        "sender": "anna@acme.example",
        "message_id": f"<{job['job_id']}@forged.example>",
        "reply": "250 2.0.0 OK",
        "message": None,
        "next_attempt_ms": None,
        "verdict": {
            "status": "sent",
            "reason": None,
            "detail": None,
            "smtp_reply": "250 2.0.0 OK",
            "fates": [fate],
            "settled": [fate],
        },
    }


FORGED_OPTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "an eta far in the future": lambda job: {"eta": FAR_FUTURE_MS},
    "a time limit of one millisecond": lambda job: {"time_limit": 1},
    "an outcome claiming the job was sent": lambda job: {"unrecorded_outcome": forged_outcome(job)},
    "attempt counts that are no numbers": lambda job: {"retries": "many", "requeues": [1]},
    "a made-up seal": lambda job: {"retries": 7, "seal": "0" * 64},
    "a priority, a pipe and exceptions to swallow": lambda job: {
        "broker_priority": 255,
        "pipe_target": {"actor_name": "x"},
        "throws": "Exception",
    },
}


@pytest.mark.parametrize("forgery", sorted(FORGED_OPTIONS))
def test_forged_worker_options_are_ignored_and_the_job_is_sent_once(
    forgery: str,
    lanes: Settings,
    hostile_worker: RunningWorker,
    sink: Sink,
    make_tenant: Callable[..., str],
    db: Connection,
) -> None:
    tenant = make_tenant()
    ignored_before = metric_total(hostile_worker, "postbote_unsealed_options_total", queue="documents")
    jobs = [an_invoice(tenant, to=[f"kunde{n}@example.com"]) for n in range(3)]
    for job in jobs:
        publish_raw_message(lanes, body_of(lanes, job, options=FORGED_OPTIONS[forgery](job)))

    ids = [j["job_id"] for j in jobs]
    assert_sent_once(db, sink, ids, timeout=20)
    lanes_ok = assert_lanes_still_work(lanes, db, tenant)
    assert_no_possible_duplicates(db, hostile_worker, [*ids, *lanes_ok])
    ignored = metric_total(hostile_worker, "postbote_unsealed_options_total", queue="documents")
    assert ignored - ignored_before >= len(jobs)


def test_a_message_put_straight_on_a_delay_queue_with_a_far_eta_is_sent_at_once(
    lanes: Settings,
    hostile_worker: RunningWorker,
    sink: Sink,
    make_tenant: Callable[..., str],
    db: Connection,
) -> None:
    tenant = make_tenant()
    jobs = [an_invoice(tenant, to=[f"kunde{n}@example.com"]) for n in range(3)] + [a_receipt(tenant)]
    for job in jobs:
        lane = RECEIPTS_QUEUE if job["document"]["type"] == "receipt" else DOCUMENTS_QUEUE
        delay_queue = queue_name(lanes.queue_prefix, lane) + ".DQ"
        body = body_of(lanes, job, queue_name=delay_queue, options={"eta": FAR_FUTURE_MS})
        publish_raw_message(lanes, body, lane=lane, queue=delay_queue)
    # Without an eta of its own making, the delay queue hands a message back due now.
    bare = an_invoice(tenant)
    delay_queue = queue_name(lanes.queue_prefix, DOCUMENTS_QUEUE) + ".DQ"
    publish_raw_message(lanes, body_of(lanes, bare), queue=delay_queue)

    ids = [j["job_id"] for j in [*jobs, bare]]
    assert_sent_once(db, sink, ids, timeout=20)
    lanes_ok = assert_lanes_still_work(lanes, db, tenant)
    assert_no_possible_duplicates(db, hostile_worker, [*ids, *lanes_ok])


def test_attempt_counts_that_are_no_numbers_do_not_stop_a_retry(
    lanes: Settings,
    hostile_worker: RunningWorker,
    faulty_sink: Callable[..., Sink],
    make_tenant: Callable[..., str],
    db: Connection,
) -> None:
    sink = faulty_sink(
        RecipientRules, rules={"kunde@example.com": ["451 4.7.1 Greylisted, come back later", None]}
    )
    tenant = make_tenant(
        smtp={"host": sink.host, "port": sink.port, "security": "none", "helo": "test.postbote"}
    )
    job = an_invoice(tenant)
    publish_raw_message(lanes, body_of(lanes, job, options={"retries": "x", "requeues": "y"}))

    rows = wait_final(db, [job["job_id"]], timeout=30)
    assert (rows[job["job_id"]]["status"], rows[job["job_id"]]["attempts"]) == ("sent", 2)
    assert sink.handler.delivered_to("kunde@example.com") == 1
    lanes_ok = assert_lanes_still_work(lanes, db, tenant)
    assert_no_possible_duplicates(db, hostile_worker, [job["job_id"], *lanes_ok])


@pytest.mark.parametrize("timestamp", [FAR_FUTURE_MS, "yesterday", None, 1.5e300])
def test_a_message_timestamp_that_is_no_number_or_in_the_future_counts_as_now(
    timestamp: Any,
    lanes: Settings,
    hostile_worker: RunningWorker,
    make_tenant: Callable[..., str],
    db: Connection,
) -> None:
    job = an_invoice("no-such-tenant")
    before = int(time.time() * 1000)
    publish_raw_message(lanes, body_of(lanes, job, message_timestamp=timestamp, options={"retries": 99}))

    entry = dead_entry(db, job["job_id"])
    assert entry["reason"] == "unknown_tenant"
    assert entry["attempts"] == 1
    stamped = entry["message"]["message_timestamp"]
    assert type(stamped) is int and before <= stamped <= int(time.time() * 1000)
    lanes_ok = assert_lanes_still_work(lanes, db, make_tenant())
    assert_no_possible_duplicates(db, hostile_worker, list(lanes_ok))


# 3. The publisher is the user RabbitMQ checked, and a retry keeps it.


@pytest.mark.parametrize("user_id", [BROKER_USER, None])
def test_a_forged_publisher_option_is_replaced_by_the_user_rabbitmq_checked(
    user_id: str | None,
    lanes: Settings,
    hostile_worker: RunningWorker,
    make_tenant: Callable[..., str],
    db: Connection,
) -> None:
    job = an_invoice("no-such-tenant")
    body = body_of(lanes, job, options={"publisher": "erp-acme", "retries": 3})
    publish_raw_message(lanes, body, properties=pika.BasicProperties(user_id=user_id))

    entry = dead_entry(db, job["job_id"])
    assert entry["message"]["options"] == {"publisher": user_id}
    assert entry["attempts"] == 1
    lanes_ok = assert_lanes_still_work(lanes, db, make_tenant())
    assert_no_possible_duplicates(db, hostile_worker, list(lanes_ok))


def test_a_retry_keeps_its_original_publisher(
    lanes: Settings,
    hostile_worker: RunningWorker,
    faulty_sink: Callable[..., Sink],
    make_tenant: Callable[..., str],
    db: Connection,
) -> None:
    refusals = ["451 4.7.1 Greylisted, come back later", "550 5.1.1 No such user"]
    sink = faulty_sink(RecipientRules, rules={"kunde@example.com": refusals})
    tenant = make_tenant(
        smtp={"host": sink.host, "port": sink.port, "security": "none", "helo": "test.postbote"}
    )
    job = an_invoice(tenant)
    # The retry is published again by the worker, whose messages carry no user_id.
    publish_raw_message(lanes, body_of(lanes, job), properties=pika.BasicProperties(user_id=BROKER_USER))

    entry = dead_entry(db, job["job_id"])
    assert entry["reason"] == "recipients_refused"
    options = entry["message"]["options"]
    assert options["publisher"] == BROKER_USER
    assert options["retries"] == 1 and "seal" not in options
    assert_no_possible_duplicates(db, hostile_worker, [job["job_id"]])


def test_a_tenants_publishers_cannot_be_impersonated_with_a_forged_option(
    lanes: Settings,
    hostile_worker: RunningWorker,
    sink: Sink,
    make_tenant: Callable[..., str],
    db: Connection,
) -> None:
    tenant = make_tenant(publishers=["erp-acme"])
    job = an_invoice(tenant)
    body = body_of(lanes, job, options={"publisher": "erp-acme"})
    publish_raw_message(lanes, body, properties=pika.BasicProperties(user_id=BROKER_USER))

    assert dead_entry(db, job["job_id"])["reason"] == "publisher_not_permitted"
    assert not [k for k in copies_received(sink.handler) if k[0] == job["job_id"]]
    lanes_ok = assert_lanes_still_work(lanes, db, make_tenant())
    assert_no_possible_duplicates(db, hostile_worker, list(lanes_ok))


# 4. and 5. Bodies that are no dramatiq message, or too large to read, are rejected unread and
# never logged; the sweeper stores them from the .XQ queue.


def raw_id(body: bytes) -> str:
    return "raw-" + hashlib.sha256(body).hexdigest()[:32]


def wait_recorded(
    db: Connection, body: bytes, job_id: str | None = None, timeout: float = 30
) -> dict[str, Any]:
    """The dead-letter entry of a body the worker rejected, however the sweeper keys it."""
    ids = [raw_id(body), *([job_id] if job_id else [])]
    try:
        fields = json.loads(body)
        if isinstance(fields, dict) and isinstance(fields.get("message_id"), str):
            ids.append(fields["message_id"])
    except (ValueError, RecursionError):
        pass

    def entry() -> dict[str, Any] | None:
        row = db.execute(
            "SELECT id, reason, detail FROM dead_letters WHERE id = ANY(%s) OR job_id::text = ANY(%s)",
            (ids, ids),
        ).fetchone()
        return dict(row) if row else None

    found = wait_for(entry, timeout=timeout, what=f"a dead-letter entry for one of {ids}")
    assert found["reason"], found
    return found


MARKER = "Geheimnis-4711"
"""A word in each rejected body that must never reach the log."""

UNREADABLE: dict[str, Callable[[Settings], bytes]] = {
    "not JSON": lambda s: f"{MARKER} {uuid.uuid4()} {{".encode(),
    "not UTF-8": lambda s: MARKER.encode() + uuid.uuid4().bytes + b"\xff\xfe",
    "a JSON list": lambda s: json.dumps([MARKER, str(uuid.uuid4())]).encode(),
    "kwargs that are a list": lambda s: body_of(s, {"x": MARKER}, kwargs=[MARKER]),
    "options that are a list": lambda s: body_of(s, {"x": MARKER}, options=[MARKER]),
    "args that are an object": lambda s: body_of(s, {"x": MARKER}, args={"0": MARKER}),
    "a message id that is a number": lambda s: body_of(s, {"x": MARKER}, message_id=4711),
    "an empty message id": lambda s: body_of(s, {"x": MARKER}, message_id=""),
    "a field dramatiq does not have": lambda s: body_of(s, {"x": MARKER}, redelivered=MARKER),
    "deep nesting": lambda s: (
        b'{"x": "' + MARKER.encode() + b'", "y": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    ),
    "a number with 5000 digits": lambda s: body_of(s, {"x": MARKER}).replace(
        b'"kwargs"', b'"n":' + b"7" * 5000 + b',"kwargs"'
    ),
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_a_body_that_is_no_dramatiq_message_is_rejected_recorded_and_not_logged(
    kind: str,
    lanes: Settings,
    hostile_worker: RunningWorker,
    make_tenant: Callable[..., str],
    db: Connection,
) -> None:
    body = UNREADABLE[kind](lanes)
    publish_raw_message(lanes, body)

    wait_recorded(db, body)
    lanes_ok = assert_lanes_still_work(lanes, db, make_tenant())
    assert_no_possible_duplicates(db, hostile_worker, list(lanes_ok))
    assert MARKER not in hostile_worker.output()


def huge_invoice(settings: Settings, tenant: str, attachment_chars: int, **fields: Any) -> tuple[str, bytes]:
    """(job id, body) of an invoice with an attachment of ``attachment_chars`` base64 characters."""
    job = an_invoice(tenant)
    job["attachments"][0]["content_base64"] = "QUJD" * (attachment_chars // 4)
    job["subject"] = f"{MARKER} {job['subject']}"
    return job["job_id"], body_of(settings, job, **fields)


def test_oversized_messages_are_rejected_unread_under_a_memory_limit(
    settings: Settings, sink: Sink, make_tenant: Callable[..., str], db: Connection
) -> None:
    own = isolated_settings(settings)  # max_job_bytes as shipped: 20 MiB
    tenant = make_tenant()
    # About three times what an idle worker process maps: room for a few bodies, not for many.
    running = RunningWorker(own, processes=1, threads=2, address_space_bytes=800 * 2**20)
    try:
        assert_lanes_still_work(own, db, tenant, within_s=60)
        children = worker_children(running.process.pid)
        assert len(children) == 1

        documents = queue_name(own.queue_prefix, DOCUMENTS_QUEUE)
        # A delay queue's consumer holds what it takes until it is due; dramatiq would take 2000.
        delay_queue = f"{documents}.DQ"
        targets = [documents] * 3 + [delay_queue] * 10 + [queue_name(own.queue_prefix, RECEIPTS_QUEUE)]
        published = []
        for target in targets:
            eta = {"eta": FAR_FUTURE_MS} if target == delay_queue else {}
            job_id, body = huge_invoice(own, tenant, 30_000_000, options=eta)
            assert len(body) > own.max_message_bytes
            publish_raw_message(own, body, queue=target)
            published.append((job_id, body))
        for job_id, body in published:
            wait_recorded(db, body, job_id, timeout=60)

        lanes_ok = assert_lanes_still_work(own, db, tenant)
        assert worker_children(running.process.pid) == children, "a worker process was restarted"
        rows = db.execute(
            "SELECT status FROM deliveries WHERE job_id = ANY(%s::uuid[])", ([j for j, _ in published],)
        ).fetchall()
        assert rows == [], "an oversized job reached the job path"
        assert_no_possible_duplicates(db, running, list(lanes_ok))
        output = running.output()
        assert "MemoryError" not in output and "Restarting consumer" not in output, output[-3000:]
        assert MARKER not in output
    finally:
        running.stop()
        delete_queues(own)
