"""Whatever anyone with publish rights puts into a lane's ``.XQ`` queue, the sweeper stores it as a
dead job with a reason (and its raw bytes), acknowledges it only then, and keeps sweeping."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest

import worker.runtime.sweeper as sweeper
from schemas.constants import (
    DOCUMENTS_QUEUE,
    METRIC_THREAD_RESTARTS,
    METRIC_WORKER_RESTARTS,
    RECEIPTS_QUEUE,
    queue_name,
)
from tests.support.faults import dramatiq_message
from tests.support.hostile import assert_lanes_still_work, publish_raw_message
from tests.support.ledger import wait_dead
from tests.support.observe import sample, wait_metrics
from tests.support.services import RunningWorker, delete_queues, isolated_settings
from worker.db import Connection
from worker.runtime.sweeper import (
    KEPT_PREFIX_BYTES,
    UnstoredMessages,
    raw_id,
    sweep_once,
)
from worker.runtime.watchdog import Backoff, RestartCounts, SupervisedThread
from worker.settings import Settings


def dead_queue(settings: Settings, lane: str = DOCUMENTS_QUEUE) -> str:
    return f"{queue_name(settings.queue_prefix, lane)}.XQ"


def waiting_in(settings: Settings, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def message_with(settings: Settings, **fields: Any) -> bytes:
    """A dramatiq message whose ``fields`` are replaced (``None`` removes one)."""
    message = json.loads(dramatiq_message(settings, {"job_id": str(uuid.uuid4())}))
    message.update(fields)
    return json.dumps({k: v for k, v in message.items() if v is not None}).encode()


POISON: dict[str, tuple[Callable[[Settings], bytes], str, str]] = {
    "nested too deeply for json.loads": (
        lambda s: b"[" * 200_000 + b"]" * 200_000,
        "malformed_json",
        "nested too deeply",
    ),
    "an integer longer than Python converts": (
        lambda s: b'{"queue_name": ' + b"7" * 5000 + b"}",
        "malformed_json",
        "integer string conversion",
    ),
    "args that are not a list": (
        lambda s: message_with(s, args="not a list"),
        "not_a_dramatiq_message",
        "wrong type of args",
    ),
    "options that are not an object": (
        lambda s: message_with(s, options=[1, 2]),
        "not_a_dramatiq_message",
        "wrong type of options",
    ),
    "a message_id that is not a string": (
        lambda s: message_with(s, message_id=4711),
        "not_a_dramatiq_message",
        "wrong type of message_id",
    ),
    "kwargs that are null": (
        lambda s: json.dumps({**json.loads(message_with(s)), "kwargs": None}).encode(),
        "not_a_dramatiq_message",
        "wrong type of kwargs",
    ),
    "a message_id of a megabyte": (
        lambda s: message_with(s, message_id="m" * 1_000_000),
        "not_a_dramatiq_message",
        "message_id empty or longer than",
    ),
    "fields dramatiq does not have": (
        lambda s: message_with(s, colour="blue"),
        "not_a_dramatiq_message",
        "1 fields dramatiq does not have",
    ),
    "JSON that is a list": (lambda s: b"[1, 2, 3]", "not_a_dramatiq_message", "not an object"),
    "not UTF-8": (lambda s: b"\xff\xfe\x00garbage", "malformed_json", "not JSON"),
}


@pytest.fixture(scope="module")
def poisoned(settings: Settings) -> Iterator[tuple[Settings, RunningWorker]]:
    """A worker of this module's own (a sweeper stuck on one case must not hold up other tests)."""
    own = isolated_settings(settings)
    running = RunningWorker(own, threads=2)
    yield own, running
    running.stop()
    delete_queues(own)


@pytest.mark.parametrize("case", sorted(POISON))
def test_a_poison_message_in_xq_is_stored_with_a_reason_and_the_sweeper_keeps_sweeping(
    poisoned: tuple[Settings, RunningWorker], make_tenant: Any, db: Connection, case: str
) -> None:
    settings, worker = poisoned
    make_body, reason, detail = POISON[case]
    body = make_body(settings)
    publish_raw_message(settings, body, queue=dead_queue(settings))

    dead = wait_dead(db, raw_id(body))
    assert (dead["reason"], dead["queue_name"]) == (
        reason,
        queue_name(settings.queue_prefix, DOCUMENTS_QUEUE),
    )
    assert detail in dead["detail"]
    assert bytes(dead["raw_body"]) == body

    # The sweeper still runs: the next message in .XQ, on the other lane, is swept too.
    follower = b"not JSON either " + uuid.uuid4().hex.encode()
    publish_raw_message(settings, follower, queue=dead_queue(settings, RECEIPTS_QUEUE))
    assert wait_dead(db, raw_id(follower))["reason"] == "malformed_json"
    assert waiting_in(settings, dead_queue(settings)) == 0
    restarts = sample(wait_metrics(worker.metrics_port), METRIC_THREAD_RESTARTS, thread="sweeper")
    assert restarts == 0
    assert_lanes_still_work(settings, db, make_tenant())


def test_a_body_too_large_to_decode_is_stored_undecoded_with_its_size_digest_and_first_64_kib(
    own_queues: Settings, make_tenant: Any, db: Connection
) -> None:
    limit = 200_000
    running = RunningWorker(own_queues, threads=1, max_job_bytes=limit)
    try:
        attachment = "A" * own_queues.model_copy(update={"max_job_bytes": limit}).max_message_bytes
        body = message_with(own_queues, args=[{"attachments": [{"content_base64": attachment}]}])
        publish_raw_message(own_queues, body, queue=dead_queue(own_queues))

        dead = wait_dead(db, raw_id(body))
        assert dead["reason"] == "too_large"
        assert str(len(body)) in dead["detail"]
        assert hashlib.sha256(body).hexdigest() in dead["detail"]
        assert bytes(dead["raw_body"]) == body[:KEPT_PREFIX_BYTES]
        assert waiting_in(own_queues, dead_queue(own_queues)) == 0
        assert_lanes_still_work(own_queues, db, make_tenant())
    finally:
        running.stop()


def test_a_message_the_sweeper_cannot_read_is_stored_raw_naming_the_error(
    own_queues: Settings, db: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(body: bytes, queue: str, **_: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(sweeper, "dead_job_of", broken)
    body = message_with(own_queues)
    publish_raw_message(own_queues, body, queue=dead_queue(own_queues))

    assert sweep_once(own_queues) == 1

    dead = wait_dead(db, raw_id(body))
    assert dead["reason"] == "internal_error"
    assert "KeyError" in dead["detail"]
    assert bytes(dead["raw_body"]) == body
    assert waiting_in(own_queues, dead_queue(own_queues)) == 0


def test_a_message_that_cannot_be_stored_at_all_stays_in_xq_and_does_not_hold_up_the_rest(
    own_queues: Settings, db: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck, behind = message_with(own_queues), message_with(own_queues)
    store = sweeper.store_dead_job

    def refuse_the_stuck_one(conn: Connection, dead: Any) -> str:
        if dead.id in (json.loads(stuck)["message_id"], raw_id(stuck)):
            raise RuntimeError("the store refuses this one")
        return store(conn, dead)

    monkeypatch.setattr(sweeper, "store_dead_job", refuse_the_stuck_one)
    publish_raw_message(own_queues, stuck, queue=dead_queue(own_queues))
    publish_raw_message(own_queues, behind, queue=dead_queue(own_queues))

    with pytest.raises(UnstoredMessages):
        sweep_once(own_queues)

    assert wait_dead(db, json.loads(behind)["message_id"])["reason"] == "rejected_by_worker"
    assert waiting_in(own_queues, dead_queue(own_queues)) == 1
    assert (
        db.execute(
            "SELECT 1 FROM dead_letters WHERE id IN (%s, %s)",
            (json.loads(stuck)["message_id"], raw_id(stuck)),
        ).fetchone()
        is None
    )

    monkeypatch.undo()
    assert sweep_once(own_queues) == 1
    assert wait_dead(db, json.loads(stuck)["message_id"])["reason"] == "rejected_by_worker"
    assert waiting_in(own_queues, dead_queue(own_queues)) == 0


def test_a_sweeper_that_raises_is_restarted_later_each_time_counted_and_reported_down() -> None:
    stop = threading.Event()
    counts = RestartCounts(threads=["sweeper"])
    runs: list[float] = []

    def sweep(stop: threading.Event) -> None:
        runs.append(time.monotonic())
        if len(runs) <= 3:
            raise RecursionError("a poison message")
        stop.wait()

    thread = SupervisedThread(
        "sweeper", sweep, stop, backoff=Backoff(cap_s=1.5, reset_after_s=60), counts=counts
    )
    thread.start()
    try:
        deadline = time.monotonic() + 2
        while thread.problem() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        problem = thread.problem()
        assert problem is not None and "sweeper thread is down (RecursionError: a poison message)" in problem

        deadline = time.monotonic() + 10
        while len(runs) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(runs) == 4
        gaps = [later - earlier for earlier, later in zip(runs, runs[1:], strict=False)]
        for gap, delay in zip(gaps, [0.5, 1.0, 1.5], strict=True):
            assert delay <= gap < delay + 0.25, gaps
        time.sleep(0.1)
        assert thread.problem() is None
        families = {f.name: f for f in counts.collect()}
        [restarts] = families[METRIC_THREAD_RESTARTS.removesuffix("_total")].samples
        assert (restarts.labels, restarts.value) == ({"thread": "sweeper"}, 3)
    finally:
        stop.set()


def test_the_worker_serves_the_restart_counters_from_zero(own_queues: Settings) -> None:
    running = RunningWorker(own_queues, threads=1)
    try:
        text = wait_metrics(running.metrics_port)
        assert sample(text, METRIC_THREAD_RESTARTS, thread="sweeper") == 0
        assert sample(text, METRIC_THREAD_RESTARTS, thread="queue_gauges") == 0
        assert sample(text, METRIC_WORKER_RESTARTS) == 0
    finally:
        running.stop()
