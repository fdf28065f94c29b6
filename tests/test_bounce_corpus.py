"""Bounce reports as Exchange, Microsoft 365, Gmail, qmail, Exim and Postfix write them, and the
customer mail that arrives next to them: every report lands on its own job and recipient with its
RFC 3463 class, nothing else is attributed to anything, and a second ingest changes nothing."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.support.bounces import accepted_job, corpus_report, events_of, expected_classes
from tests.support.services import postbote
from worker.bounces import ingest_report
from worker.bounces.classify import BounceClass, classify
from worker.db import Connection
from worker.settings import Settings

CUSTOMER = "kunde@example.com"
EXPECTED = expected_classes()


def tenant() -> str:
    return f"b{uuid.uuid4().hex[:10]}"


def recipient(db: Connection, job_id: str, address: str = CUSTOMER) -> dict[str, object]:
    row = db.execute(
        "SELECT state, reply_code, reply_enhanced, reply_text FROM delivery_recipients"
        " WHERE job_id = %s AND address = %s",
        (job_id, address),
    ).fetchone()
    assert row is not None
    return row


def job_row(db: Connection, job_id: str) -> dict[str, object]:
    row = db.execute("SELECT status, reason FROM deliveries WHERE job_id = %s", (job_id,)).fetchone()
    assert row is not None
    return row


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_report_lands_on_its_own_job_and_recipient_once_and_other_mail_on_nothing(
    db: Connection, name: str
) -> None:
    owner = tenant()
    job_id = accepted_job(db, owner, CUSTOMER)
    bystander = accepted_job(db, owner, CUSTOMER)
    data = corpus_report(name, job_id, to=CUSTOMER, other_job=bystander)

    ingested = ingest_report(db, data)

    classes = [c.value for _, c, _ in ingested.recorded]
    assert classes == EXPECTED[name]
    assert all((str(m.job_id), m.address) == (job_id, CUSTOMER) for m, _, _ in ingested.recorded)
    assert events_of(db, bystander) == []
    assert recipient(db, bystander)["state"] == "accepted"
    if not classes:
        assert events_of(db, job_id) == []
        assert recipient(db, job_id)["state"] == "accepted"
        assert job_row(db, job_id) == {"status": "sent", "reason": None}
    elif classes == ["delayed"]:
        assert [o for _, _, o in ingested.recorded] == ["delayed"]
        assert recipient(db, job_id)["state"] == "accepted"
        assert job_row(db, job_id)["status"] == "sent"
        assert [e["type"] for e in events_of(db, job_id)] == ["delayed"]
    else:
        assert [o for _, _, o in ingested.recorded] == ["bounced"]
        assert recipient(db, job_id)["state"] == "bounced"
        assert job_row(db, job_id) == {"status": "failed", "reason": "bounced"}
        [event] = events_of(db, job_id)
        assert event["type"] == "bounced"
        assert event["body"]["status"] == "failed"
        assert event["body"]["recipients"][0]["state"] == "bounced"

    events_before = events_of(db, job_id)
    state_before = recipient(db, job_id)
    again = ingest_report(db, data)
    assert [o for _, _, o in again.recorded] == ["duplicate"] * len(classes)
    assert events_of(db, job_id) == events_before
    assert recipient(db, job_id) == state_before


def test_every_report_that_carries_the_original_headers_is_matched() -> None:
    matchable = [name for name, classes in EXPECTED.items() if classes]
    assert len(matchable) >= 9
    assert {"exchange_legacy.eml", "qmail.eml", "exim.eml", "gmail_plain.eml"} <= set(matchable)


def test_the_reply_of_the_report_is_the_recipients_reply_in_the_ledger(db: Connection) -> None:
    job_id = accepted_job(db, tenant(), CUSTOMER)
    ingest_report(db, corpus_report("m365_dsn.eml", job_id, to=CUSTOMER))
    assert recipient(db, job_id) == {
        "state": "bounced",
        "reply_code": 550,
        "reply_enhanced": "5.1.10",
        "reply_text": "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
    }


def test_one_of_two_customers_bouncing_makes_the_job_partial_and_an_archive_bounce_changes_no_status(
    db: Connection,
) -> None:
    job_id = accepted_job(db, tenant(), CUSTOMER, "zweite@example.com", archive="archiv@acme.example")
    ingest_report(db, corpus_report("qmail.eml", job_id, to=CUSTOMER))
    assert job_row(db, job_id) == {"status": "partial", "reason": "bounced"}
    ingest_report(db, corpus_report("m365_dsn.eml", job_id, to="archiv@acme.example"))
    assert recipient(db, job_id, "archiv@acme.example")["state"] == "bounced"
    assert job_row(db, job_id)["status"] == "partial"
    assert [e["type"] for e in events_of(db, job_id)] == ["bounced", "bounced"]


def test_a_hard_bounce_suppresses_the_address_for_its_class_and_a_policy_refusal_suppresses_nothing(
    db: Connection,
) -> None:
    owner = tenant()
    for name, address in (
        ("m365_dsn.eml", "weg@example.com"),
        ("exim.eml", "voll@example.com"),
        ("policy_dsn.eml", "spam@example.com"),
    ):
        ingest_report(db, corpus_report(name, accepted_job(db, owner, address), to=address))
    rows = db.execute(
        "SELECT address, source, class, round(extract(epoch FROM expires_at - created_at) / 86400) AS days"
        " FROM suppressions WHERE tenant_id = %s ORDER BY address",
        (owner,),
    ).fetchall()
    assert [(r["address"], r["source"], r["class"], r["days"]) for r in rows] == [
        ("voll@example.com", "bounce", "mailbox_full", 7),
        ("weg@example.com", "bounce", "invalid_recipient", None),
    ]


@pytest.mark.parametrize(
    ("action", "status", "expected"),
    [
        ("failed", "5.1.1", BounceClass.INVALID_RECIPIENT),
        ("failed", "5.1.10", BounceClass.INVALID_RECIPIENT),
        ("failed", "5.2.2", BounceClass.MAILBOX_FULL),
        ("failed", "4.2.2", BounceClass.MAILBOX_FULL),
        ("failed", "5.7.1", BounceClass.POLICY),
        ("failed", "5.4.4", BounceClass.ROUTING),
        ("failed", "5.0.0", BounceClass.OTHER),
        ("failed", None, BounceClass.OTHER),
        ("delayed", "4.4.1", BounceClass.DELAYED),
    ],
)
def test_the_class_follows_rfc_3463(action: str, status: str | None, expected: BounceClass) -> None:
    assert classify(action, status) is expected


def test_bounces_ingest_reads_a_maildir_in_place_and_status_shows_the_reports_reply(
    settings: Settings, db: Connection, tmp_path: Path
) -> None:
    owner = tenant()
    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    jobs = {}
    for n, name in enumerate(sorted(EXPECTED)):
        jobs[name] = accepted_job(db, owner, CUSTOMER)
        (maildir / ("new" if n % 2 else "cur") / f"{n}.mx:2,").write_bytes(
            corpus_report(name, jobs[name], to=CUSTOMER)
        )
    before = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in maildir.rglob("*") if p.is_file()}

    first = postbote(settings, "bounces", "ingest", str(maildir), "--tenant", owner, "--json")
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(lines) == len(EXPECTED)
    recorded = [r for line in lines for r in line["recorded"]]
    assert len(recorded) == sum(len(c) for c in EXPECTED.values())
    assert {r["outcome"] for r in recorded} == {"bounced", "delayed"}

    second = postbote(settings, "bounces", "ingest", str(maildir), "--tenant", owner, "--json")
    assert {r["outcome"] for line in second.stdout.splitlines() for r in json.loads(line)["recorded"]} == {
        "duplicate"
    }
    after = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in maildir.rglob("*") if p.is_file()}
    assert after == before

    shown = postbote(settings, "status", jobs["qmail.eml"])
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (record["status"], record["reason"]) == ("failed", "bounced")
    [customer] = record["recipients"]
    assert customer["state"] == "bounced"
    assert "550 5.1.1" in customer["reply"]


def test_bounces_ingest_of_a_missing_file_says_so_and_exits_2(settings: Settings) -> None:
    result = postbote(settings, "bounces", "ingest", "/nonexistent/report.eml")
    assert result.returncode == 2
    assert "/nonexistent/report.eml: no such file or directory" in result.stderr


def test_bounces_ingest_reads_one_report_from_standard_input_as_a_local_mta_pipes_it(
    settings: Settings, db: Connection
) -> None:
    job_id = accepted_job(db, tenant(), CUSTOMER)
    piped = postbote(
        settings, "bounces", "ingest", "-", input=corpus_report("exim.eml", job_id, to=CUSTOMER).decode()
    )
    assert piped.returncode == 0, piped.stderr
    assert f"stdin: bounced: job {job_id} {CUSTOMER} (mailbox_full, 5.2.2) by message_id" in piped.stdout
    customer_reply = postbote(
        settings, "bounces", "ingest", input=corpus_report("customer_reply.eml", job_id, to=CUSTOMER).decode()
    )
    assert customer_reply.stdout == "stdin: no bounce report; left alone\n"
