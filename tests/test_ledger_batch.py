"""Claims and records of many threads written together (against the real PostgreSQL): each
thread gets its own answer, a value the database refuses fails only its own job, and an outage
reaches every waiting thread as one, after which the writer connects again."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import psycopg
import pytest

from schemas.job import Job
from tests.test_ledger_records import attempt_of
from worker.db import Connection, connect
from worker.errors import DatabaseUnavailable
from worker.job.intake import payload_digest
from worker.job.ledger import Claim, ClaimResult, claim_job, record_attempt, release_claims, session_name
from worker.job.ledger_batch import LedgerBatcher
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.vocabulary import Status

THREADS = 12


@pytest.fixture
def batcher(settings: Settings) -> Iterator[LedgerBatcher]:
    writer = LedgerBatcher(lambda: connect(settings.database_url, autocommit=True), wait_s=30)
    yield writer
    writer.close()


def a_job() -> tuple[Job, dict[str, Any]]:
    data = make_job(f"t{uuid.uuid4().hex[:8]}", "invoice", 1, user_id="u1", to="kunde@example.com")
    return Job.model_validate(data), data


def together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` in threads released at the same moment; their results or exceptions."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        start.wait()
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - compared by the test
            return e

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def claim(writer: LedgerBatcher, job: Job, data: dict[str, Any], claim_ms: int = 60_000) -> ClaimResult:
    return claim_job(writer, job, payload_digest(data), holder="host-a:1", claim_ms=claim_ms)


def test_each_thread_gets_its_own_claim_and_record(batcher: LedgerBatcher, db: Connection) -> None:
    jobs = [a_job() for _ in range(THREADS * 4)]
    claims = together([lambda j=j: claim(batcher, *j) for j in jobs])
    assert [c.claim for c in claims] == [Claim.CLAIMED] * len(jobs)
    assert all(c.attempts == 1 for c in claims)

    again = together([lambda j=j: claim(batcher, *j) for j in jobs[:THREADS]])
    assert [c.claim for c in again] == [Claim.BUSY] * THREADS

    statuses = together([lambda j=j: record_attempt(batcher, attempt_of(j[0], "host-a:1")) for j in jobs])
    assert statuses == [Status.SENT] * len(jobs)
    rows = db.execute(
        "SELECT count(*) FILTER (WHERE status = 'sent') AS sent,"
        " (SELECT count(*) FROM delivery_attempts WHERE job_id = ANY(%(j)s)) AS attempts,"
        " (SELECT count(*) FROM events WHERE job_id = ANY(%(j)s)) AS events"
        " FROM deliveries WHERE job_id = ANY(%(j)s)",
        {"j": [j.job_id for j, _ in jobs]},
    ).fetchone()
    assert rows == {"sent": len(jobs), "attempts": len(jobs), "events": len(jobs)}


def test_messages_to_park_reach_their_own_jobs(batcher: LedgerBatcher, db: Connection) -> None:
    jobs = [a_job() for _ in range(THREADS)]
    parked = {n: f"message {n}".encode() for n in range(0, THREADS, 3)}

    def claim_or_park(n: int) -> ClaimResult:
        job, data = jobs[n]
        parking = ("pbtest.documents", parked[n]) if n in parked else None
        return claim_job(
            batcher,
            job,
            payload_digest(data),
            holder="host-a:1",
            claim_ms=60_000,
            parking=parking,
            series_wait_ms=5_000 if parking else None,
        )

    results = together([lambda n=n: claim_or_park(n) for n in range(THREADS)])
    assert [r.claim for r in results] == [
        Claim.PARKED if n in parked else Claim.CLAIMED for n in range(THREADS)
    ]
    rows = db.execute(
        "SELECT job_id, message FROM parked_jobs WHERE job_id = ANY(%s)", ([j.job_id for j, _ in jobs],)
    ).fetchall()
    assert {row["job_id"]: bytes(row["message"]) for row in rows} == {
        jobs[n][0].job_id: message for n, message in parked.items()
    }


def test_a_value_the_database_refuses_fails_only_its_own_job(batcher: LedgerBatcher) -> None:
    jobs = [a_job() for _ in range(THREADS)]
    refused = jobs[3]
    results = together(
        [
            lambda j=j: claim(batcher, *j, claim_ms=2**70 if j is refused else 60_000)  # beyond bigint
            for j in jobs
        ]
    )
    assert isinstance(results[3], psycopg.DataError)
    assert [r.claim for n, r in enumerate(results) if n != 3] == [Claim.CLAIMED] * (THREADS - 1)


def test_an_outage_reaches_every_waiting_thread_and_the_writer_connects_again(
    batcher: LedgerBatcher, db: Connection
) -> None:
    claim(batcher, *a_job())
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    jobs = [a_job() for _ in range(THREADS)]
    results = together([lambda j=j: claim(batcher, *j) for j in jobs])
    failed = [r for r in results if isinstance(r, DatabaseUnavailable)]
    assert failed, "the terminated connection was not noticed"
    assert all(isinstance(r, DatabaseUnavailable | ClaimResult) for r in results)
    assert claim(batcher, *a_job()).claim is Claim.CLAIMED


def test_a_database_that_cannot_be_reached_fails_every_call_quickly() -> None:
    writer = LedgerBatcher(
        lambda: connect("postgresql://postgres@127.0.0.1:1/postbote", autocommit=True), wait_s=30
    )
    try:
        started = time.monotonic()
        results = together([lambda: claim(writer, *a_job()) for _ in range(THREADS)])
        assert all(isinstance(r, DatabaseUnavailable) for r in results)
        assert time.monotonic() - started < 20
    finally:
        writer.close()


def test_a_closed_writer_answers_at_once(settings: Settings) -> None:
    writer = LedgerBatcher(lambda: connect(settings.database_url, autocommit=True), wait_s=None)
    claim(writer, *a_job())
    writer.close()
    with pytest.raises(DatabaseUnavailable):
        claim(writer, *a_job())


def test_a_claim_still_being_written_when_its_process_died_is_released_too(settings: Settings) -> None:
    # A killed process's last batch can still be running in its server session: released before
    # it commits, its claims would hold their jobs until they expire.
    holder = f"host-dead:{uuid.uuid4().hex[:8]}"
    job, data = a_job()
    dying = connect(settings.database_url, application_name=session_name(holder))
    assert claim_job(dying, job, payload_digest(data), holder=holder, claim_ms=600_000).claim is Claim.CLAIMED
    with connect(settings.database_url) as supervisor:
        released = threading.Thread(target=release_claims, args=(supervisor, holder))
        released.start()
        released.join(30)
        assert not released.is_alive()
    with suppress(psycopg.Error):
        dying.commit()
    dying.close()
    with connect(settings.database_url, autocommit=True) as conn:
        again = claim_job(conn, job, payload_digest(data), holder="host-b:1", claim_ms=60_000)
    assert again.claim in (Claim.CLAIMED, Claim.TAKEN_OVER)
