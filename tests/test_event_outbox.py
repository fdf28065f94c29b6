"""Every change of a job's state in the ledger writes its event in the same transaction: no event
for a state the ledger does not hold, no state change without its event."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.faults import dramatiq_message
from tests.support.hostile import publish_raw_message
from tests.support.ledger import wait_dead, wait_final
from tests.support.services import RunningWorker, delete_queues, isolated_settings, postbote, send_jobs
from worker.db import Connection
from worker.job.ledger import event_reply
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import RecipientRules

GREYLISTED = "451 4.7.1 greylisted, try again later"


@pytest.fixture(scope="module")
def event_settings(settings: Settings) -> Iterator[Settings]:
    own = isolated_settings(settings, max_attempts=4, min_backoff_ms=200, max_backoff_ms=500)
    yield own
    delete_queues(own)


@pytest.fixture(scope="module")
def event_worker(event_settings: Settings) -> Iterator[RunningWorker]:
    running = RunningWorker(event_settings, processes=1, threads=4)
    yield running
    running.stop()


@pytest.fixture
def tenant_on_rules(
    faulty_sink: Callable[..., Sink], make_tenant: Callable[..., str]
) -> Callable[..., tuple[str, Sink]]:
    def make(**rules: list[str | None]) -> tuple[str, Sink]:
        sink = faulty_sink(RecipientRules, rules=rules)
        tenant = make_tenant(
            smtp={"host": sink.host, "port": sink.port, "security": "none"},
            archive_bcc="archiv@acme.example",
        )
        return tenant, sink

    return make


def events_of(db: Connection, job_id: str) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT seq, type, body FROM events WHERE job_id = %s ORDER BY seq", (job_id,)
    ).fetchall()


def assert_events_agree_with_the_ledger(
    db: Connection, job_id: str, types: list[str]
) -> list[dict[str, Any]]:
    events = events_of(db, job_id)
    assert [e["type"] for e in events] == types
    assert [e["seq"] for e in events] == list(range(1, len(types) + 1))
    ledger = db.execute("SELECT status, reason FROM deliveries WHERE job_id = %s", (job_id,)).fetchone()
    last = events[-1]["body"]
    assert (last["status"], last["reason"]) == (ledger["status"], ledger["reason"])
    recipients = db.execute(
        "SELECT address, state FROM delivery_recipients WHERE job_id = %s ORDER BY position", (job_id,)
    ).fetchall()
    assert [(r["address"], r["state"]) for r in last["recipients"]] == [
        (r["address"], r["state"]) for r in recipients
    ]
    read_back = db.execute(
        "SELECT postbote_event_body(d, postbote_event_recipients(d.job_id)) AS body"
        " FROM deliveries d WHERE job_id = %s",
        (job_id,),
    ).fetchone()
    assert last == read_back["body"]
    return events


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [(250, "2.0.0", "Ok"), (250, None, ""), (None, None, None), (0, None, "x"), (451, "4.7.1", "")],
)
def test_a_worker_lists_a_reply_as_the_ledger_reads_it_back(
    db: Connection, code: int | None, enhanced: str | None, text: str | None
) -> None:
    fate = {"code": code, "enhanced": enhanced, "text": text}
    row = db.execute(
        "SELECT NULLIF(concat_ws(' ', NULLIF(%s::integer, 0)::text, %s::text, %s::text), '') AS reply",
        (code, enhanced, text),
    ).fetchone()
    assert event_reply(fate) == row["reply"]


def test_a_sent_job_has_one_sent_event_with_its_recipients(
    event_settings: Settings, event_worker: RunningWorker, tenant_on_rules: Any, db: Connection
) -> None:
    tenant, _ = tenant_on_rules()
    [job_id] = send_jobs(
        event_settings, [make_job(tenant, "invoice", 1, user_id="u1", to="kunde@example.com")]
    )
    wait_final(db, [job_id])
    [event] = assert_events_agree_with_the_ledger(db, job_id, ["sent"])
    body = event["body"]
    assert body["document"]["type"] == "invoice" and body["tenant"] == tenant
    assert [(r["role"], r["state"]) for r in body["recipients"]] == [
        ("to", "accepted"),
        ("archive", "accepted"),
    ]
    assert body["recipients"][0]["reply"].startswith("250")


def test_a_greylisted_job_has_a_retrying_event_with_the_next_attempt_then_sent(
    event_settings: Settings, event_worker: RunningWorker, tenant_on_rules: Any, db: Connection
) -> None:
    tenant, _ = tenant_on_rules(**{"kunde@example.com": [GREYLISTED, None]})
    [job_id] = send_jobs(
        event_settings, [make_job(tenant, "invoice", 1, user_id="u1", to="kunde@example.com")]
    )
    wait_final(db, [job_id])
    retrying, _ = assert_events_agree_with_the_ledger(db, job_id, ["retrying", "sent"])
    assert retrying["body"]["next_attempt_at"]
    assert retrying["body"]["recipients"][0]["reply"] == GREYLISTED


def test_a_refused_job_is_failed_then_dead_and_a_replay_is_an_event_too(
    event_settings: Settings, event_worker: RunningWorker, tenant_on_rules: Any, db: Connection
) -> None:
    tenant, sink = tenant_on_rules(**{"weg@example.com": ["550 5.1.1 user unknown"]})
    [job_id] = send_jobs(event_settings, [make_job(tenant, "invoice", 1, user_id="u1", to="weg@example.com")])
    wait_final(db, [job_id])
    deadline = time.monotonic() + 20
    while [e["type"] for e in events_of(db, job_id)] != ["failed", "dead"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_events_agree_with_the_ledger(db, job_id, ["failed", "dead"])
    sink.handler.rules["weg@example.com"] = [None]
    assert postbote(event_settings, "dlq", "replay", job_id).returncode == 0
    deadline = time.monotonic() + 30
    while [e["type"] for e in events_of(db, job_id)][-1:] != ["sent"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_events_agree_with_the_ledger(db, job_id, ["failed", "dead", "replayed", "sent"])


def test_no_event_is_written_for_a_job_the_ledger_does_not_know(
    event_settings: Settings, event_worker: RunningWorker, db: Connection
) -> None:
    job = make_job("nobody", "invoice", 1, user_id="u1", to="kunde@example.com", subject="a\r\nb")
    publish_raw_message(event_settings, dramatiq_message(event_settings, job))
    assert wait_dead(db, job["job_id"])["reason"] == "invalid_job"
    assert events_of(db, job["job_id"]) == []
