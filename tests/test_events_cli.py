"""`postbote events tail` shows a job's or a tenant's delivery events from the outbox, as JSON or for
people, also as they occur; `postbote events replay` publishes them again with the same event ids."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any

import pika
import pytest

from schemas.constants import events_exchange
from schemas.event import Event
from tests.support.events import emit, new_job
from tests.support.services import ROOT, isolated_settings, postbote, settings_env
from worker.db import Connection
from worker.settings import Settings


@pytest.fixture
def own(settings: Settings) -> Settings:
    """The run's database with a queue prefix of this test's own (replays go to its exchange)."""
    return isolated_settings(settings)


def event_ids(conn: Connection, job_id: str) -> list[str]:
    rows = conn.execute("SELECT event_id FROM events WHERE job_id = %s ORDER BY id", (job_id,)).fetchall()
    return [str(r["event_id"]) for r in rows]


def a_failed_invoice(conn: Connection, tenant: str) -> str:
    """A job that was retried once, then failed and was dead-lettered: three events."""
    job_id = new_job(conn, tenant)
    emit(conn, job_id, "retrying", "retrying", "smtp_temporary")
    emit(conn, job_id, "failed", "failed", "smtp_rejected")
    emit(conn, job_id, "dead", "failed", "smtp_rejected")
    return job_id


def tail_json(settings: Settings, *args: str) -> list[dict[str, Any]]:
    result = postbote(settings, "events", "tail", "--json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_tail_json_for_a_job_prints_its_events_in_order(own: Settings, db: Connection) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    job_id = a_failed_invoice(db, tenant)
    other = a_failed_invoice(db, tenant)

    events = tail_json(own, "--job", job_id)

    assert [e["event_id"] for e in events] == event_ids(db, job_id)
    assert [(e["seq"], e["type"], e["status"], e["reason"]) for e in events] == [
        (1, "retrying", "retrying", "smtp_temporary"),
        (2, "failed", "failed", "smtp_rejected"),
        (3, "dead", "failed", "smtp_rejected"),
    ]
    for event in events:
        Event.model_validate(event)
        assert (event["job_id"], event["tenant"], event["document"]) == (
            job_id,
            tenant,
            {"type": "invoice", "number": "RE-2026-0001"},
        )
    assert len(tail_json(own, "--tenant", tenant)) == 6
    assert [e["job_id"] for e in tail_json(own, "--tenant", tenant, "--lines", "2")] == [other, other]


def test_tail_prints_one_line_per_event_for_people(own: Settings, db: Connection) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    job_id = a_failed_invoice(db, tenant)

    result = postbote(own, "events", "tail", "--tenant", tenant)

    assert result.returncode == 0, result.stderr
    lines = [line.split("  ") for line in result.stdout.splitlines()]
    assert [cells[1:] for cells in lines] == [
        [tenant, "invoice RE-2026-0001", "retrying", "retrying", "smtp_temporary"],
        [tenant, "invoice RE-2026-0001", "failed", "failed", "smtp_rejected"],
        [tenant, "invoice RE-2026-0001", "dead", "failed", "smtp_rejected"],
    ]
    assert datetime.fromisoformat(lines[0][0]).tzinfo is not None
    second = event_ids(db, job_id)[1]
    assert [e["seq"] for e in tail_json(own, "--job", job_id, "--since", second)] == [2, 3]
    assert len(tail_json(own, "--job", job_id, "--since", "1h")) == 3
    assert tail_json(own, "--job", job_id, "--since", "2999-01-01T00:00:00+00:00") == []


def read_lines(stream: IO[str], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def test_tail_follow_prints_new_events_as_they_occur(own: Settings, db: Connection) -> None:
    job_id = new_job(db, f"t{uuid.uuid4().hex[:8]}")
    emit(db, job_id, "retrying", "retrying", "smtp_temporary")
    follower = subprocess.Popen(
        [sys.executable, "-m", "worker", "events", "tail", "--json", "--follow", "--job", job_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=settings_env(own),
        cwd=ROOT,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert follower.stdout is not None
    threading.Thread(target=read_lines, args=(follower.stdout, lines), daemon=True).start()
    try:
        assert json.loads(lines.get(timeout=30))["seq"] == 1
        emit(db, job_id, "sent", "sent")
        event = json.loads(lines.get(timeout=30))
        assert (event["seq"], event["type"], event["status"]) == (2, "sent", "sent")
        assert lines.empty()
    finally:
        follower.terminate()
        follower.wait(30)
        for stream in (follower.stdout, follower.stderr):
            if stream is not None:
                stream.close()


class Listener:
    """A queue bound to ``<prefix>.events``; deleted with the exchange on close."""

    def __init__(self, settings: Settings) -> None:
        self.exchange = events_exchange(settings.queue_prefix)
        self._connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
        self._channel = self._connection.channel()
        self._channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        self.queue = self._channel.queue_declare("", exclusive=True).method.queue
        self._channel.queue_bind(self.queue, self.exchange, routing_key="#")

    def drain(self) -> list[tuple[str, pika.BasicProperties, dict[str, Any]]]:
        messages = []
        while True:
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((method.routing_key, properties, json.loads(body)))

    def close(self) -> None:
        self._channel.exchange_delete(self.exchange)
        self._connection.close()


@pytest.fixture
def listener(own: Settings) -> Iterator[Listener]:
    running = Listener(own)
    yield running
    running.close()


def test_replay_publishes_the_events_again_with_their_event_ids(
    own: Settings, db: Connection, listener: Listener
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    first = a_failed_invoice(db, tenant)
    second = a_failed_invoice(db, f"t{uuid.uuid4().hex[:8]}")  # another tenant: not replayed
    exchange = events_exchange(own.queue_prefix)
    since = event_ids(db, first)[0]

    dry = postbote(own, "events", "replay", "--since", since, "--tenant", tenant, "--dry-run")
    assert (dry.returncode, dry.stdout.strip()) == (0, f"would replay 3 event(s) to {exchange}")
    assert listener.drain() == []

    result = postbote(own, "events", "replay", "--since", since, "--tenant", tenant)

    assert (result.returncode, result.stdout.strip()) == (0, f"replayed 3 event(s) to {exchange}")
    replayed = listener.drain()
    assert [body for _, _, body in replayed] == tail_json(own, "--job", first)
    assert [body["event_id"] for _, _, body in replayed] == event_ids(db, first)
    assert [key for key, _, _ in replayed] == [
        f"{tenant}.invoice.retrying",
        f"{tenant}.invoice.failed",
        f"{tenant}.invoice.dead",
    ]
    assert all(p.message_id == b["event_id"] and p.type == b["type"] for _, p, b in replayed)
    assert second not in {body["job_id"] for _, _, body in replayed}


def test_bad_input_exits_2_and_an_unknown_event_1(own: Settings) -> None:
    for args, message in (
        (("tail", "--since", "yesterday"), "is neither an event id"),
        (("tail", "--job", "not-a-job"), "is not a job id"),
        (("replay", "--since", "soon"), "is neither an event id"),
    ):
        result = postbote(own, "events", *args)
        assert result.returncode == 2, args
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    assert postbote(own, "events", "replay").returncode == 2
    unknown = postbote(own, "events", "replay", "--since", str(uuid.uuid4()))
    assert unknown.returncode == 1
    assert "in the outbox" in unknown.stderr
