"""The AMQP message a job travels in: dramatiq's format, on the job's lane."""

from __future__ import annotations

import json

from producer.envelope import encode_job, envelope
from schemas.job import Job
from worker.testbed.documents import make_job


def test_the_fast_encoding_is_the_documented_envelope() -> None:
    job = Job.model_validate(
        make_job("acme", "invoice", 1, user_id="u1", to="kö@bücher.example", subject='Grüße "x" \\ y')
    )
    queue, body = encode_job(job, "postbote")
    decoded = json.loads(body)
    expected = envelope(job, "postbote")
    decoded["message_timestamp"] = expected["message_timestamp"]
    assert queue == "postbote.documents"
    assert decoded == expected
    assert decoded["message_id"] == str(job.job_id)
    assert decoded["actor_name"] == "send_document"


def test_receipts_travel_on_their_own_lane() -> None:
    job = Job.model_validate(make_job("acme", "receipt", 1, user_id="u1", to="kunde@example.com"))
    queue, body = encode_job(job, "postbote")
    assert queue == "postbote.receipts"
    assert json.loads(body)["actor_name"] == "send_receipt"
