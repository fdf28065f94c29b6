"""`postbote send` validates everything first and publishes only when every job is valid."""

from __future__ import annotations

import json
import uuid

import pika
import pytest

from schemas.constants import DOCUMENTS_QUEUE, queue_name
from tests.support.services import delete_queues, postbote
from worker.settings import Settings
from worker.testbed.documents import make_job


def queued(settings: Settings, prefix: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        declared = connection.channel().queue_declare(queue_name(prefix, DOCUMENTS_QUEUE), passive=True)
        return int(declared.method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


@pytest.fixture
def own_prefix(settings: Settings):  # type: ignore[no-untyped-def]
    """A prefix no worker consumes, so the published messages can be counted."""
    prefix = f"pbsend-{uuid.uuid4().hex[:8]}"
    yield prefix
    delete_queues(settings.model_copy(update={"queue_prefix": prefix}))


def test_an_invalid_line_publishes_nothing_and_names_line_and_field(
    settings: Settings, own_prefix: str
) -> None:
    good = make_job("acme", "invoice", 1, user_id="u1", to="kunde@example.com")
    bad = make_job("acme", "invoice", 2, user_id="u1", to="kunde@example.com")
    bad["subject"] = "Rechnung\r\nBcc: x@evil.example"
    result = postbote(
        settings, "send", "-", input=f"{json.dumps(good)}\n{json.dumps(bad)}\n", queue_prefix=own_prefix
    )
    assert result.returncode == 2
    assert "line 2: subject" in result.stderr
    assert "nothing was published" in result.stderr
    assert result.stdout == ""
    assert queued(settings, own_prefix) == 0


def test_malformed_json_is_reported_with_its_line(settings: Settings, own_prefix: str) -> None:
    result = postbote(settings, "send", "-", input='{"tenant": \n', queue_prefix=own_prefix)
    assert result.returncode == 2
    assert "line 1: json" in result.stderr


def test_valid_jobs_are_published_and_their_ids_printed(settings: Settings, own_prefix: str) -> None:
    jobs = [make_job("acme", "invoice", n, user_id="u1", to="kunde@example.com") for n in range(3)]
    result = postbote(
        settings, "send", "-", input="\n".join(json.dumps(j) for j in jobs), queue_prefix=own_prefix
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [j["job_id"] for j in jobs]
    assert queued(settings, own_prefix) == 3


def test_a_single_pretty_printed_job_is_accepted_and_gets_an_id(settings: Settings, own_prefix: str) -> None:
    job = make_job("acme", "offer", 1, user_id="u1", to="kunde@example.com")
    del job["job_id"]
    result = postbote(settings, "send", "-", input=json.dumps(job, indent=2), queue_prefix=own_prefix)
    assert result.returncode == 0, result.stderr
    assert uuid.UUID(result.stdout.strip())


def test_an_unreachable_broker_is_a_failure_not_a_traceback(settings: Settings) -> None:
    job = make_job("acme", "invoice", 1, user_id="u1", to="kunde@example.com")
    result = postbote(
        settings, "send", "-", input=json.dumps(job), broker_url="amqp://guest:guest@127.0.0.1:1/%2F"
    )
    assert result.returncode == 1
    assert "cannot connect to RabbitMQ" in result.stderr
    assert "Traceback" not in result.stderr
