"""Every recipient's fate, exactly, for a tenant with an archive copy and the clerk in CC: the
customers decide the outcome, a temporary refusal retries only that recipient, and the internal
copies go out once and only with a customer."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.faults import assert_sent_once_or_dead, worker_children
from tests.support.ledger import dead_reasons, recipient_states
from tests.support.observe import metrics_when, sample, wait_for
from tests.support.services import RunningWorker, delete_queues, isolated_settings, postbote, send_jobs
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import RecipientRules

ARCHIVE = "archiv@acme.example"
CLERK = "bernd@acme.example"
GREYLISTED = "451 4.7.1 greylisted, try again later"
UNKNOWN = "550 5.1.1 user unknown"


@pytest.fixture(scope="module")
def fate_settings(settings: Settings) -> Iterator[Settings]:
    own = isolated_settings(settings, max_attempts=4, min_backoff_ms=300, max_backoff_ms=800)
    yield own
    delete_queues(own)


@pytest.fixture(scope="module")
def fate_worker(fate_settings: Settings) -> Iterator[RunningWorker]:
    running = RunningWorker(fate_settings, processes=1, threads=4)
    yield running
    running.stop()


@pytest.fixture
def rules_sink(faulty_sink: Callable[..., Sink]) -> Callable[..., Sink]:
    """Start a sink answering RCPT TO by per-address rules (``RecipientRules``)."""
    return lambda **options: faulty_sink(RecipientRules, **options)


@pytest.fixture(params=["unthrottled", "throttled"])
def company(request: pytest.FixtureRequest, make_tenant: Callable[..., str]) -> Callable[[Sink], str]:
    """A tenant as the settings page makes them: archive copy and clerk in CC, sending to ``sink``;
    once unthrottled (the whole transaction at once), once throttled (the envelope said while
    waiting for the series slot)."""

    def make(sink: Sink) -> str:
        return make_tenant(
            smtp={"host": sink.host, "port": sink.port, "security": "none", "helo": "test.postbote"},
            series={"batch_size": 1000, "pause_ms": 1 if request.param == "throttled" else 0},
            archive_bcc=ARCHIVE,
            cc_clerk=True,
            employees=[
                {"id": "u1", "email": "anna@acme.example", "name": "Anna Berg"},
                {"id": "u2", "email": CLERK, "name": "Bernd Clerk"},
            ],
        )

    return make


def invoice(tenant: str, *customers: str, number: int = 1) -> dict[str, Any]:
    job = make_job(tenant, "invoice", number, user_id="u1", to=customers[0], clerk_id="u2")
    job["to"] = list(customers)
    return job


def delivered(sink: Sink, *addresses: str) -> list[int]:
    handler = sink.handler
    assert isinstance(handler, RecipientRules)
    return [handler.delivered_to(a) for a in addresses]


def status(settings: Settings, *args: str) -> Any:
    result = postbote(settings, "status", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_greylisted_customer_is_retried_alone_and_everyone_gets_exactly_one_mail(
    fate_settings: Settings, fate_worker: RunningWorker, rules_sink: Any, company: Any, db: Connection
) -> None:
    sink = rules_sink(rules={"kunde@example.com": [GREYLISTED, GREYLISTED, None]})
    [job_id] = send_jobs(fate_settings, [invoice(company(sink), "kunde@example.com")])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["status"] == "sent"
    assert delivered(sink, "kunde@example.com", ARCHIVE, CLERK) == [1, 1, 1]
    record = status(fate_settings, job_id)
    assert [(r["address"], r["role"], r["state"]) for r in record["recipients"]] == [
        ("kunde@example.com", "to", "accepted"),
        ("bernd@acme.example", "clerk", "accepted"),
        ("archiv@acme.example", "archive", "accepted"),
    ]
    history = record["history"]
    assert [h["outcome"] for h in history] == ["retrying", "retrying", "sent"]
    customer_replies = [
        {r["address"]: r["reply"] for r in h["recipients"]}["kunde@example.com"] for h in history
    ]
    assert customer_replies[:2] == [GREYLISTED] * 2
    assert customer_replies[2].startswith("250")
    assert record["next_attempt_at"] is None


def test_the_status_of_a_job_waiting_for_a_greylisted_customer_says_when_it_is_tried_again(
    fate_settings: Settings, fate_worker: RunningWorker, rules_sink: Any, company: Any, db: Connection
) -> None:
    sink = rules_sink(rules={"kunde@example.com": [GREYLISTED]})
    tenant = company(sink)
    job = invoice(tenant, "kunde@example.com")
    [job_id] = send_jobs(fate_settings, [job])

    def retrying() -> dict[str, Any] | None:
        row = db.execute(
            "SELECT status, next_attempt_at FROM deliveries WHERE job_id = %s", (job_id,)
        ).fetchone()
        return row if row and row["status"] == "retrying" and row["next_attempt_at"] else None

    wait_for(retrying, what="the job retrying")
    [record] = status(fate_settings, "--document", "invoice", job["document"]["number"], "--tenant", tenant)
    assert record["job_id"] == job_id
    assert record["status"] == "retrying"
    assert record["next_attempt_at"]
    assert {r["address"]: (r["state"], r["reply"]) for r in record["recipients"]}["kunde@example.com"] == (
        "pending",
        GREYLISTED,
    )
    assert delivered(sink, "kunde@example.com", ARCHIVE, CLERK) == [0, 0, 0]
    assert_sent_once_or_dead(db, [job_id], sink.handler)


def test_a_refused_only_customer_fails_the_job_with_no_copy_anywhere_and_a_replay_delivers_once_to_each(
    fate_settings: Settings, fate_worker: RunningWorker, rules_sink: Any, company: Any, db: Connection
) -> None:
    sink = rules_sink(rules={"weg@example.com": [UNKNOWN]})
    tenant = company(sink)
    [job_id] = send_jobs(fate_settings, [invoice(tenant, "weg@example.com")])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert (rows[job_id]["status"], rows[job_id]["reason"]) == ("failed", "recipients_refused")
    assert delivered(sink, "weg@example.com", ARCHIVE, CLERK) == [0, 0, 0]
    assert sink.handler.received == []
    assert dead_reasons(db, [job_id]) == {job_id: "recipients_refused"}
    listed = postbote(fate_settings, "dlq", "list", "--json")
    assert job_id in listed.stdout

    failed = {"tenant": tenant, "doc_type": "invoice", "reason": "recipients_refused"}
    text = wait_for(
        lambda: metrics_when(
            fate_worker.metrics_port, lambda t: sample(t, "postbote_mails_failed_total", **failed) == 1
        ),
        what="the failed job in /metrics",
    )
    assert not sample(text, "postbote_mails_sent_total", tenant=tenant, doc_type="invoice")
    assert sample(text, "postbote_recipients_total", tenant=tenant, role="to", outcome="refused") == 1

    sink.handler.rules["weg@example.com"] = [None]
    replayed = postbote(fate_settings, "dlq", "replay", job_id)
    assert replayed.returncode == 0, replayed.stderr
    deadline = time.monotonic() + 30
    while (
        db.execute("SELECT status FROM deliveries WHERE job_id = %s", (job_id,)).fetchone()["status"]
        != "sent"
    ):
        assert time.monotonic() < deadline, "the replayed job was not sent"
        time.sleep(0.1)
    assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert delivered(sink, "weg@example.com", ARCHIVE, CLERK) == [1, 1, 1]


def test_one_customer_refused_and_one_accepted_is_partial_with_one_archive_copy(
    fate_settings: Settings, fate_worker: RunningWorker, rules_sink: Any, company: Any, db: Connection
) -> None:
    sink = rules_sink(rules={"weg@example.com": [UNKNOWN]})
    [job_id] = send_jobs(fate_settings, [invoice(company(sink), "weg@example.com", "da@example.com")])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert (rows[job_id]["status"], rows[job_id]["reason"]) == ("partial", "recipients_refused")
    assert recipient_states(db, job_id) == {
        "weg@example.com": ("to", "refused"),
        "da@example.com": ("to", "accepted"),
        CLERK: ("clerk", "accepted"),
        ARCHIVE: ("archive", "accepted"),
    }
    assert delivered(sink, "weg@example.com", "da@example.com", ARCHIVE, CLERK) == [0, 1, 1, 1]
    assert dead_reasons(db, [job_id]) == {}


def test_a_greylisted_and_an_accepting_customer_each_get_exactly_one_mail(
    fate_settings: Settings, fate_worker: RunningWorker, rules_sink: Any, company: Any, db: Connection
) -> None:
    sink = rules_sink(rules={"grau@example.com": [GREYLISTED, None]})
    [job_id] = send_jobs(fate_settings, [invoice(company(sink), "grau@example.com", "da@example.com")])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["status"] == "sent"
    assert delivered(sink, "grau@example.com", "da@example.com", ARCHIVE, CLERK) == [1, 1, 1, 1]
    # The retry carried the greylisted customer alone, with the very bytes the others got.
    handler = sink.handler
    first, retry = [(handler.maildir / r.file).read_bytes() for r in handler.received]
    assert [r.rcpt_tos for r in handler.received][1] == ["grau@example.com"]
    assert first == retry


def test_too_many_recipients_split_over_transactions_reach_each_recipient_once(
    fate_settings: Settings, fate_worker: RunningWorker, rules_sink: Any, company: Any, db: Connection
) -> None:
    sink = rules_sink(per_transaction=2)
    customers = ["eins@example.com", "zwei@example.com", "drei@example.com"]
    [job_id] = send_jobs(fate_settings, [invoice(company(sink), *customers)])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["status"] == "sent"
    assert delivered(sink, *customers, ARCHIVE, CLERK) == [1] * 5
    assert [len(r.rcpt_tos) for r in sink.handler.received] == [2, 2, 1]


def test_a_421_in_the_middle_of_the_envelope_is_retried_and_reaches_each_recipient_once(
    fate_settings: Settings, fate_worker: RunningWorker, rules_sink: Any, company: Any, db: Connection
) -> None:
    sink = rules_sink(rules={"zwei@example.com": ["421 4.3.2 Service shutting down", None]})
    customers = ["eins@example.com", "zwei@example.com"]
    [job_id] = send_jobs(fate_settings, [invoice(company(sink), *customers)])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["status"] == "sent"
    assert delivered(sink, *customers, ARCHIVE, CLERK) == [1] * 4


def test_a_worker_killed_while_a_greylisted_customer_waits_sends_no_one_a_second_mail(
    settings: Settings, make_tenant: Any, rules_sink: Any, db: Connection
) -> None:
    slow = isolated_settings(settings, max_attempts=4, min_backoff_ms=4000, max_backoff_ms=5000)
    sink = rules_sink(rules={"grau@example.com": [GREYLISTED, None]})
    tenant = make_tenant(
        smtp={"host": sink.host, "port": sink.port, "security": "none"},
        archive_bcc=ARCHIVE,
        cc_clerk=True,
        employees=[{"id": "u1", "email": "anna@acme.example"}, {"id": "u2", "email": CLERK}],
    )
    worker = RunningWorker(slow, processes=1, threads=2)
    try:
        [job_id] = send_jobs(slow, [invoice(tenant, "grau@example.com", "da@example.com")])

        def first_transaction_recorded() -> bool | None:
            states = recipient_states(db, job_id)
            return True if states.get("da@example.com", ("", ""))[1] == "accepted" else None

        wait_for(first_transaction_recorded, what="the first transaction in the ledger")
        children = worker_children(worker.process.pid)
        assert children, worker.output()
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        rows = assert_sent_once_or_dead(db, [job_id], sink.handler, timeout=60)
        assert rows[job_id]["status"] == "sent"
        assert delivered(sink, "grau@example.com", "da@example.com", ARCHIVE, CLERK) == [1, 1, 1, 1]
        assert "exited with -9" in worker.output()
    finally:
        worker.stop()
        delete_queues(slow)


def test_a_customer_still_greylisted_after_the_last_attempt_leaves_the_job_partial_not_dead(
    fate_settings: Settings, fate_worker: RunningWorker, rules_sink: Any, company: Any, db: Connection
) -> None:
    sink = rules_sink(rules={"grau@example.com": [GREYLISTED]})
    [job_id] = send_jobs(fate_settings, [invoice(company(sink), "grau@example.com", "da@example.com")])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["status"] == "partial"
    assert recipient_states(db, job_id)["grau@example.com"] == ("to", "refused")
    assert delivered(sink, "grau@example.com", "da@example.com", ARCHIVE, CLERK) == [0, 1, 1, 1]
    assert sink.handler.rcpt_seen["grau@example.com"] == fate_settings.max_attempts
    assert dead_reasons(db, [job_id]) == {}


def test_an_archive_refused_for_now_is_retried_alone_once_the_customer_has_the_mail(
    fate_settings: Settings, fate_worker: RunningWorker, rules_sink: Any, company: Any, db: Connection
) -> None:
    sink = rules_sink(rules={ARCHIVE: ["451 4.2.0 mailbox busy, try again later", None]})
    [job_id] = send_jobs(fate_settings, [invoice(company(sink), "kunde@example.com")])
    rows = assert_sent_once_or_dead(db, [job_id], sink.handler)
    assert rows[job_id]["status"] == "sent"
    assert delivered(sink, "kunde@example.com", ARCHIVE, CLERK) == [1, 1, 1]
    assert [r.rcpt_tos for r in sink.handler.received][1] == [ARCHIVE]
