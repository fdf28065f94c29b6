"""Only the worker holding a job's claim records its outcome (against the real PostgreSQL)."""

from __future__ import annotations

import time
import uuid

import pytest

from schemas.job import Job
from worker.db import Connection
from worker.errors import ClaimedElsewhere
from worker.job.intake import payload_digest
from worker.job.ledger import Claim, claim_job, record_attempt
from worker.job.outcome import AttemptRecord, Fate, Verdict
from worker.testbed.documents import make_job
from worker.vocabulary import RecipientState, Role, Status


def attempt_of(job: Job, worker: str) -> AttemptRecord:
    fate = Fate("kunde@example.com", Role.TO, RecipientState.ACCEPTED, None, 1)
    return AttemptRecord(
        job_id=job.job_id,
        attempt=1,
        started_at=time.time(),
        duration_ms=5,
        worker=worker,
        tried=("kunde@example.com",),
        sender="anna@acme.example",
        message_id=f"<{job.job_id}@acme.example>",
        reply="250 ok",
        verdict=Verdict(Status.SENT, (fate,), settled=(fate,)),
    )


def claimed(db: Connection, holder: str) -> Job:
    data = make_job(f"t{uuid.uuid4().hex[:8]}", "invoice", 1, user_id="u1", to="kunde@example.com")
    job = Job.model_validate(data)
    assert claim_job(db, job, payload_digest(data), holder=holder, claim_ms=60_000).claim is Claim.CLAIMED
    return job


def test_the_claim_holder_records_the_outcome(db: Connection) -> None:
    job = claimed(db, "host-a:1")
    assert record_attempt(db, attempt_of(job, "host-a:1")) is Status.SENT
    row = db.execute("SELECT status, claimed_by FROM deliveries WHERE job_id = %s", (job.job_id,)).fetchone()
    assert (row["status"], row["claimed_by"]) == ("sent", None)


def test_a_worker_not_holding_the_claim_records_nothing(db: Connection) -> None:
    job = claimed(db, "host-a:1")
    with pytest.raises(ClaimedElsewhere):
        record_attempt(db, attempt_of(job, "host-b:2"))
    row = db.execute("SELECT status FROM deliveries WHERE job_id = %s", (job.job_id,)).fetchone()
    assert row["status"] == "sending"
    counts = db.execute(
        "SELECT (SELECT count(*) FROM delivery_recipients WHERE job_id = %(j)s) AS recipients,"
        " (SELECT count(*) FROM delivery_attempts WHERE job_id = %(j)s) AS attempts",
        {"j": job.job_id},
    ).fetchone()
    assert counts == {"recipients": 0, "attempts": 0}


def test_an_outcome_recorded_already_is_not_recorded_again(db: Connection) -> None:
    job = claimed(db, "host-a:1")
    record = attempt_of(job, "host-a:1")
    record_attempt(db, record)
    with pytest.raises(ClaimedElsewhere):
        record_attempt(db, record)
