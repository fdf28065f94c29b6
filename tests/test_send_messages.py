"""Published jobs are encoded one at a time, as they go out, into the documented envelope."""

from __future__ import annotations

import json
from typing import Any

from producer.envelope import JobMessages, encode_job
from schemas.job import Job
from worker.testbed.documents import make_job


def decoded(body: bytes) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(body)
    del message["message_timestamp"]
    return message


def test_each_message_is_the_jobs_encoding_on_its_lane() -> None:
    jobs = [
        Job.model_validate(make_job("acme", doc_type, n, user_id="u1", to="kunde@example.com"))
        for n, doc_type in enumerate(["receipt", "invoice", "receipt", "offer"])
    ]
    messages = JobMessages(jobs, "pb")
    assert len(messages) == 4
    assert messages.queues() == ["pb.receipts", "pb.documents"]
    for job, (queue, body) in zip(jobs, messages, strict=True):
        expected_queue, expected_body = encode_job(job, "pb")
        assert queue == expected_queue
        assert decoded(body) == decoded(expected_body)
    rest = messages[2:]
    assert len(rest) == 2
    assert decoded(rest[0][1])["message_id"] == str(jobs[2].job_id)
    assert rest.queues() == ["pb.receipts", "pb.documents"]
