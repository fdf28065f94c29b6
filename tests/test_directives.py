"""The race between a cancel and a send is decided per job in PostgreSQL: by the last check before
DATA, under the job's row lock (no worker needed to show it)."""

from __future__ import annotations

import hashlib
import uuid

from schemas.job import Job
from worker.db import Connection
from worker.job.directives import Scope, cancel, cancel_counts, directive_scope, pause, resume
from worker.job.ledger import Claim, ClaimResult, claim_job
from worker.job.parking import Check, before_data, park
from worker.testbed.documents import make_job
from worker.vocabulary import Reason, Status

HOLDER = "test-host:1"


def claim(db: Connection, tenant: str, doc_type: str = "dunning") -> tuple[Job, ClaimResult]:
    job = Job.model_validate(make_job(tenant, doc_type, 1, user_id="u1", to="kunde@example.com"))
    return job, claim_job(
        db, job, hashlib.sha256(job.dump_json()).hexdigest(), holder=HOLDER, claim_ms=60_000
    )


def claimed(db: Connection, tenant: str) -> Job:
    job, result = claim(db, tenant)
    assert result.claim is Claim.CLAIMED
    return job


def parked(db: Connection, job: Job) -> bool:
    return park(
        db,
        job.job_id,
        holder=HOLDER,
        reason=Reason.PAUSED,
        status=Status.HELD,
        wait_ms=None,
        queue="q",
        message=b"m",
    )


def status_of(db: Connection, job: Job) -> str:
    row = db.execute("SELECT status FROM deliveries WHERE job_id = %s", (job.job_id,)).fetchone()
    assert row is not None
    return str(row["status"])


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def test_a_job_past_its_check_before_data_is_too_late_to_cancel_and_is_counted_in_flight(
    db: Connection,
) -> None:
    t = tenant()
    job = claimed(db, t)
    assert before_data(db, job.job_id, holder=HOLDER) is Check.GO
    directive, given_at = cancel(db, Scope(tenant=t), reason=None, by="op@host")
    assert status_of(db, job) == "sending"
    counts = cancel_counts(db, directive_scope(db, directive), directive=directive, given_at=given_at)
    assert (counts.cancelled, counts.in_flight, counts.waiting) == (0, 1, 0)


def test_a_job_claimed_before_the_cancel_is_cancelled_at_its_workers_check_before_data(
    db: Connection,
) -> None:
    t = tenant()
    job = claimed(db, t)
    directive, given_at = cancel(
        db, Scope(tenant=t, doc_types=("dunning",)), reason="wrong template", by="op@host"
    )
    assert status_of(db, job) == "sending"
    assert before_data(db, job.job_id, holder=HOLDER) is Check.CANCELLED
    assert status_of(db, job) == "cancelled"
    counts = cancel_counts(db, directive_scope(db, directive), directive=directive, given_at=given_at)
    assert (counts.cancelled, counts.in_flight, counts.waiting) == (1, 0, 0)


def test_a_parked_job_is_cancelled_and_forgotten_and_a_later_job_is_not(db: Connection) -> None:
    t = tenant()
    job = claimed(db, t)
    assert parked(db, job)
    cancel(db, Scope(tenant=t), reason=None, by="op@host")
    assert status_of(db, job) == "cancelled"
    assert db.execute("SELECT 1 FROM parked_jobs WHERE job_id = %s", (job.job_id,)).fetchone() is None
    later = claimed(db, t)
    assert status_of(db, later) == "sending"


def test_a_pause_parks_at_the_claim_and_at_the_last_check_and_resume_makes_held_jobs_due(
    db: Connection,
) -> None:
    t = tenant()
    early = claimed(db, t)
    pause(db, t, None, reason=None, by="op@host")
    assert before_data(db, early.job_id, holder=HOLDER) is Check.PAUSED
    job = Job.model_validate(make_job(t, "invoice", 2, user_id="u1", to="kunde@example.com"))
    result = claim_job(db, job, hashlib.sha256(job.dump_json()).hexdigest(), holder=HOLDER, claim_ms=60_000)
    assert (result.claim, result.reason, result.status) == (Claim.PARK, Reason.PAUSED, Status.HELD)
    assert parked(db, job)
    receipt = Job.model_validate(make_job(t, "receipt", 3, user_id="u1", to="kunde@example.com"))
    assert (
        claim_job(
            db, receipt, hashlib.sha256(receipt.dump_json()).hexdigest(), holder=HOLDER, claim_ms=60_000
        ).claim
        is Claim.CLAIMED
    )
    resumed = resume(db, t, None, by="op@host")
    assert (resumed.lifted, resumed.released) == (1, 1)
    row = db.execute("SELECT due_at FROM parked_jobs WHERE job_id = %s", (job.job_id,)).fetchone()
    assert row is not None and row["due_at"] is not None
